"""Writes that fail, on real file systems: a full disk (a small tmpfs), a file size limit
(RLIMIT_FSIZE), a read-only directory (a read-only tmpfs: as root, permission bits stop nothing),
a missing one; and MLflow stores that fail (a file:// store MLflow 3 refuses, the default SQLite
store in a read-only working directory, a real `mlflow server` killed mid-search).

What must hold: a write that fails is one line on stderr naming the file and exit status 2 (never
a traceback), nothing already computed is lost (result.json stays valid, the study keeps every
finished trial, and the command the line gives continues the search), no temporary file is left;
MLflow trouble never stops a search: one line says tracking is off, the summary and result.json
say so instead of giving a run id.

The tmpfs tests need `mount` (root, or a container allowed to mount); they are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpsearch.cache import append_bytes, atomic_write_bytes
from mpsearch.cli import main
from mpsearch.results.records import SearchResult

CLI = [sys.executable, "-m", "mpsearch.cli"]
RUN_ID = re.compile(r"\b[0-9a-f]{32}\b")


def _env(**extra: str) -> dict[str, str]:
    """The CLI's environment: MLflow's default store (no MLFLOW_TRACKING_URI), stdout buffered as
    when it is a file (no PYTHONUNBUFFERED)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONUNBUFFERED")}
    return env | extra


def cli(*argv: str, cwd: Path, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *argv], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
                          check=False, **kw)


def run_main(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    """A real tmpfs of `size` (mount's size=, e.g. 64k) at `path`, unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"{'ro,' if read_only else ''}size={size}"
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True, text=True,
                       check=False)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): {p.stderr.strip() or p.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True, capture_output=True)


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders of mpsearch's writes (hidden ones included)."""
    return sorted(str(p) for p in folder.rglob("*") if ".tmp" in p.name)


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def resume_command(line: str) -> list[str]:
    """The command an error line says continues the search (between backticks), as argv."""
    m = re.search(r"`(mpsearch [^`]+)`", line)
    assert m, line
    argv = shlex.split(m.group(1))
    return [*CLI, *argv[1:]]


def _tracking_off(p: subprocess.CompletedProcess, out: Path, why: str) -> dict:
    """The search went on: exit 0, one MLflow line on stderr saying why, the summary says tracking
    is off (no run id, no `mlflow ui` step), result.json's tracking too. Returns that tracking."""
    assert p.returncode == 0, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    said = [ln for ln in lines(p.stderr) if "MLflow" in ln or "mlflow" in ln]
    assert len(said) == 1, p.stderr
    assert why in said[0] and "continuing without it" in said[0], said[0]
    summary = [ln for ln in lines(p.stdout) if ln.startswith("MLflow:")]
    assert len(summary) == 1 and summary[0].startswith("MLflow: tracking off (") and why in summary[0], p.stdout
    assert "mlflow ui" not in p.stdout and "open http" not in p.stdout
    d = json.loads((out / "result.json").read_text())
    tracking = d["tracking"]
    assert tracking["run_id"] is None and why in tracking["off"], tracking
    assert (out / "report.html").exists() and (out / "best_config.json").exists()
    return tracking


# -- MLflow ---------------------------------------------------------------------------------------

def test_a_file_store_mlflow_refuses_turns_tracking_off_and_the_search_goes_on(tmp_path):
    out = tmp_path / "out"
    p = cli("search", "--task", "digits", "--trials", "4", "--seed", "0", "--no-progress", "--out", str(out),
            "--mlflow-uri", f"file://{tmp_path / 'mlruns'}", cwd=tmp_path)
    tracking = _tracking_off(p, out, "maintenance mode")
    assert "MLFLOW_ALLOW_FILE_STORE" in tracking["off"]  # said, not set behind the user's back
    assert "incomplete_run_id" not in tracking and not RUN_ID.search(p.stdout)
    assert len(SearchResult.read(out / "result.json").trials) == 4
    assert not (tmp_path / "mlruns").exists()


def test_b_default_store_in_a_read_only_working_directory_turns_tracking_off_at_once(tmp_path):
    out = tmp_path / "out"
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as ro:
        t0 = time.time()
        p = cli("search", "--task", "digits", "--trials", "4", "--seed", "0", "--no-progress", "--out", str(out),
                cwd=ro)
        took = time.time() - t0
    _tracking_off(p, out, "Read-only file system")
    assert f"sqlite:///{ro}/mlflow.db" in p.stderr
    assert took < 100, took  # not MLflow's two minutes of retries to open the database
    assert len(SearchResult.read(out / "result.json").trials) == 4


def test_c_a_server_killed_mid_search_stops_tracking_in_one_line(tmp_path, free_port, mlflow_server_factory):
    out = tmp_path / "out"
    n = 150
    with mlflow_server_factory(tmp_path, free_port()) as (uri, server):
        search = subprocess.Popen(
            [*CLI, "search", "--task", "digits", "--trials", str(n), "--seed", "0", "--strategy", "optuna",
             "--no-progress", "--out", str(out), "--mlflow-uri", uri],
            cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        seen = 0
        while seen < 3:  # a few trials logged, then the server dies
            assert search.poll() is None and time.time() < deadline, search.communicate()[1][-3000:]
            with contextlib.suppress(OSError, ValueError, KeyError):
                seen = len(json.loads((out / "result.json").read_text())["trials"])
            time.sleep(0.1)
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(timeout=60)
        stdout, stderr = search.communicate(timeout=600)
    p = subprocess.CompletedProcess(search.args, search.returncode, stdout, stderr)
    assert seen < n
    tracking = _tracking_off(p, out, "stopped while")
    assert re.search(r": (cannot connect|request failed): ", tracking["off"]) and len(tracking["off"]) < 200, tracking
    assert RUN_ID.fullmatch(tracking["incomplete_run_id"])
    summary = next(ln for ln in lines(stdout) if ln.startswith("MLflow:"))
    assert f"run {tracking['incomplete_run_id']} is incomplete" in summary
    assert len(SearchResult.read(out / "result.json").trials) == n


# -- a full disk, a file size limit ---------------------------------------------------------------

def test_d_a_full_disk_mid_search_keeps_the_trials_and_the_resume_it_names_finishes(tmp_path):
    """--out on a 64 KiB tmpfs (the study elsewhere): the first result.json fits, a later rewrite
    does not."""
    n = 40
    study = tmp_path / "study.log"
    with tmpfs(tmp_path / "out", "64k") as out:
        p = cli("search", "--task", "digits", "--trials", str(n), "--seed", "0", "--no-progress", "--no-mlflow",
                "--out", str(out), "--storage", f"journal:///{study}", cwd=tmp_path)
        assert p.returncode == 2, p.stderr[-3000:]
        err = lines(p.stderr)
        assert len(err) == 1, p.stderr
        assert err[0].startswith(f"mpsearch: error: No space left on device: {out / 'result.json'}; "
                                 f"the finished trials are kept in the study ({study}): free some space, then `"), err[0]
        assert not leftovers(out)
        kept = SearchResult.read(out / "result.json")  # the last one written, whole
        assert 1 <= len(kept.trials) < n

        remount(out, "size=16m")
        again = subprocess.run(resume_command(err[0]), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                               timeout=600, check=False)
        assert again.returncode == 0, again.stderr[-3000:]
        done = SearchResult.read(out / "result.json")
        assert len(done.trials) == n and [t.number for t in done.trials[:len(kept.trials)]] == \
            [t.number for t in kept.trials]
        assert (out / "report.html").exists() and not leftovers(out)


def test_d_a_disk_full_before_the_first_trial_says_nothing_was_kept(tmp_path):
    """An 8 KiB tmpfs: the output directory's lock fits, the new study's journal does not."""
    with tmpfs(tmp_path / "out", "8k") as out:
        p = cli("search", "--task", "digits", "--trials", "4", "--seed", "0", "--no-progress", "--no-mlflow",
                "--out", str(out), cwd=tmp_path)
        said = (f"mpsearch: error: No space left on device: {out / 'study.log'}; nothing was kept: free some space, "
                "then run it again\n")
        assert (p.returncode, p.stderr) == (2, said)
        assert os.listdir(out) == []


def _file_size_limit(limit: int):
    def apply() -> None:  # in the child: writes past the limit fail with EFBIG instead of killing it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_d_a_file_size_limit_mid_journal_append_keeps_the_study_whole(tmp_path):
    """RLIMIT_FSIZE (portable: no mount): the study's journal, the largest file, reaches it first,
    part-way through an append. The journal must not keep the partial line (the next run's appends
    would follow it and break the study for good)."""
    import optuna

    from mpsearch.engine.storage import make_storage

    n, out = 30, tmp_path / "out"
    argv = ["search", "--task", "digits", "--trials", str(n), "--seed", "0", "--strategy", "optuna", "--no-progress",
            "--no-mlflow", "--no-evaluator-cache", "--out", str(out)]
    p = cli(*argv, cwd=tmp_path, preexec_fn=_file_size_limit(30_000))
    assert p.returncode == 2, p.stderr[-3000:]
    err = lines(p.stderr)
    assert len(err) == 1, p.stderr
    journal = out / "study.log"
    assert err[0].startswith(f"mpsearch: error: File too large: {journal}; the finished trials are kept in the study "
                             f"({journal}): raise the file size limit (ulimit -f), then `"), err[0]
    assert journal.read_bytes().endswith(b"\n")  # no partial line
    assert not leftovers(out)
    kept = SearchResult.read(out / "result.json")
    assert kept.trials

    again = subprocess.run(resume_command(err[0]), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(SearchResult.read(out / "result.json").trials) == n
    store = make_storage(f"journal:///{journal}")
    (name,) = optuna.study.get_all_study_names(store)
    complete = optuna.load_study(study_name=name, storage=store).get_trials(
        deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == n


def test_atomic_write_removes_its_temporary_file_on_any_failure(tmp_path):
    path = tmp_path / "result.json"
    path.write_text("old")
    with pytest.raises(TypeError):
        atomic_write_bytes(path, "not bytes")  # a failure that is no OSError
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_append_is_whole_or_nothing_on_a_full_disk(tmp_path):
    with tmpfs(tmp_path / "small", "16k") as small:
        log = small / "study.log"
        append_bytes(log, b"x" * 8000 + b"\n")
        with pytest.raises(OSError) as e:
            append_bytes(log, b"y" * 16000 + b"\n")
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(log)
        assert log.read_bytes() == b"x" * 8000 + b"\n"  # cut back: no partial line
        append_bytes(log, b"z\n")  # and appends go on after it
        assert log.read_bytes().endswith(b"x\nz\n")


# -- report, export, stdout -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    """A finished digits search (no MLflow) to report and export."""
    root = tmp_path_factory.mktemp("searched")
    p = cli("search", "--task", "digits", "--trials", "4", "--seed", "0", "--no-progress", "--no-mlflow",
            "--out", str(root / "out"), cwd=root)
    assert p.returncode == 0, p.stderr[-3000:]
    return root / "out"


@pytest.mark.parametrize("name", ["best.json", "best.onnx"])
def test_e_export_to_a_read_only_or_missing_place_is_one_line(searched, tmp_path, capsys, name):
    missing = tmp_path / "missing" / name
    rc, out, err = run_main(capsys, "export", str(searched), "--out", str(missing))
    assert (rc, out, err) == (2, "", f"mpsearch: error: No such file or directory: {missing}\n")
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as ro:
        rc, out, err = run_main(capsys, "export", str(searched), "--out", str(ro / name))
        assert (rc, out, err) == (2, "", f"mpsearch: error: Read-only file system: {ro / name}\n")


def test_e_export_to_a_full_disk_leaves_no_partial_file(searched, tmp_path, capsys):
    with tmpfs(tmp_path / "full", "8k") as full:
        rc, out, err = run_main(capsys, "export", str(searched), "--out", str(full / "best.onnx"))
        assert (rc, out, err) == (2, "", f"mpsearch: error: No space left on device: {full / 'best.onnx'}\n")
        assert os.listdir(full) == []


def test_e_report_to_a_read_only_or_full_place_is_one_line_and_keeps_the_old_report(searched, tmp_path, capsys):
    result = (searched / "result.json").read_bytes()
    html = (searched / "report.html").stat().st_size
    with tmpfs(tmp_path / "ro", "16m") as ro:
        (ro / "result.json").write_bytes(result)
        remount(ro, "ro")
        rc, out, err = run_main(capsys, "report", str(ro), "--no-png")
        assert (rc, out, err) == (2, "", f"mpsearch: error: Read-only file system: {ro / 'report.html'}\n")
    with tmpfs(tmp_path / "full", "16m") as full:
        (full / "result.json").write_bytes(result)
        (full / "report.html").write_text("old report")
        with open(full / "filler", "wb") as f:  # what is left: half the new report
            f.write(b"\0" * (os.statvfs(full).f_bavail * os.statvfs(full).f_frsize - html // 2))
        rc, out, err = run_main(capsys, "report", str(full), "--no-png")
        assert (rc, out, err) == (2, "", f"mpsearch: error: No space left on device: {full / 'report.html'}\n")
        assert (full / "report.html").read_text() == "old report" and not leftovers(full)


def test_e_report_pngs_on_a_full_disk_are_one_line_and_leave_nothing_behind(searched, browser, tmp_path, capsys):
    """kaleido reports a failed write instead of raising it (plotly's write_images dropped it: the
    PNGs were silently missing)."""
    result = (searched / "result.json").read_bytes()
    html = (searched / "report.html").stat().st_size
    with tmpfs(tmp_path / "full", "16m") as full:
        (full / "result.json").write_bytes(result)
        with open(full / "filler", "wb") as f:  # room for the report and 16 KiB more, not for a PNG
            free = os.statvfs(full).f_bavail * os.statvfs(full).f_frsize
            f.write(b"\0" * (free - html - 16 * 1024))
        rc, out, err = run_main(capsys, "report", str(full))
        assert rc == 2 and out == "", (out, err)
        assert re.fullmatch(rf"mpsearch: error: No space left on device: {re.escape(str(full))}/\w+\.png\n", err), err
        assert (full / "report.html").exists() and not list(full.glob("*.png")) and not leftovers(full)


def test_stdout_on_a_full_device_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        p = subprocess.run([*CLI, "tasks"], cwd=tmp_path, env=_env(), stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=120, check=False)
    assert (p.returncode, p.stderr) == (2, "mpsearch: error: No space left on device: <stdout>\n")
