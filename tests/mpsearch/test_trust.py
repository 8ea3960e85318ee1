"""The trust boundary: code runs only from a task the user names, never from one a data file
(result.json, a shared study) names. A task file here leaves a mark each time it is imported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "mpsearch.cli"]

MARKING_TASK = """
from pathlib import Path
Path(__file__).with_name("ran").open("a").write("x")  # what a payload would do: run on import

from mpsearch.tasks.digits import build as digits


def build():
    return digits()
"""


def cli(*argv, cwd=None):
    return subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=600, check=False, cwd=cwd)


def refused(p, *needles):
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    task = root / "marking.py"
    task.write_text(MARKING_TASK)
    out = root / "out"
    storage = f"sqlite:///{root / 'study.db'}"
    p = cli("search", "--task", f"{task}:build", "--trials", "3", "--strategy", "optuna", "--out", str(out),
            "--storage", storage, "--study-name", "s", "--no-mlflow", "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    assert (root / "ran").exists()  # the user named it: it ran
    assert f"mpsearch export {out} --task {task}:build --out best.onnx" in p.stdout  # the next steps name it
    assert f"mpsearch verify {out} --task {task}:build" in p.stdout
    return root, task, out, storage


def test_export_and_verify_refuse_a_task_named_only_in_result_json(searched, tmp_path):
    root, task, out, _ = searched
    (root / "ran").unlink()
    ref = f"{task}:build"
    p = cli("export", str(out), "--out", str(tmp_path / "m.onnx"))
    refused(p, f"names the task {ref!r}", "runs code only from a task you name", f"--task {ref}")
    p = cli("verify", str(out), "--no-progress")
    refused(p, f"names the task {ref!r}", f"--task {ref}")
    assert not (root / "ran").exists() and not (tmp_path / "m.onnx").exists()  # nothing ran, nothing written
    # a hand-edited result.json pointing a built-in search at a file is refused the same way
    edited = tmp_path / "edited"
    edited.mkdir()
    d = json.loads((out / "result.json").read_text())
    (edited / "result.json").write_text(json.dumps({**d, "task": ref, "settings": {**d["settings"], "task_ref": ref}}))
    refused(cli("export", str(edited), "--out", str(tmp_path / "e.onnx")), "--task")
    assert not (root / "ran").exists()
    # named by the user: it runs
    p = cli("export", str(out), "--out", str(tmp_path / "m.onnx"), "--task", ref)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (root / "ran").exists() and (tmp_path / "m.onnx").stat().st_size > 1000


def test_a_worker_runs_only_the_task_its_user_names(searched, tmp_path):
    root, task, _, storage = searched
    (root / "ran").unlink(missing_ok=True)
    ref = f"{task}:build"
    p = cli("worker", "--storage", storage, "--study-name", "s", "--out", str(tmp_path / "w"), "--no-progress")
    refused(p, "study 's' names the task", f"--task {ref}")
    other = tmp_path / "other.py"
    other.write_text(MARKING_TASK)
    p = cli("worker", "--storage", storage, "--study-name", "s", "--task", f"{other}:build", "--out",
            str(tmp_path / "w"), "--no-progress")
    refused(p, f"runs the task {ref!r}, not", "a worker runs the study's task")
    assert not (root / "ran").exists() and not (tmp_path / "ran").exists()
    # the study already holds its 3 trials: the worker, told the task, joins, says which it runs, and ends
    p = cli("worker", "--storage", storage, "--study-name", "s", "--task", ref, "--out", str(tmp_path / "w"),
            "--no-progress")
    assert p.returncode == 0, p.stderr[-2000:]
    assert f"mpsearch worker: study 's': task {ref}" in p.stderr
    assert len(json.loads((tmp_path / "w" / "result.json").read_text())["trials"]) == 3


def test_a_built_in_task_needs_no_task_option(tmp_path):
    from mpsearch.errors import UntrustedTaskError
    from mpsearch.tasks import trusted_task

    assert trusted_task("digits", None, "result.json") == "digits"
    assert trusted_task("x.py:build", "x.py:build", "result.json") == "x.py:build"
    for stored in ("x.py:build", "some.module:build", "nosuch"):
        with pytest.raises(UntrustedTaskError, match="--task"):
            trusted_task(stored, None, "result.json")
    Path(tmp_path / "t.py").write_text("")
    with pytest.raises(UntrustedTaskError, match="a worker runs the study's task"):
        trusted_task(f"{tmp_path / 't.py'}:build", "digits", "study 's'", same=True)
