"""Resume after kill -9: a trial whose process is gone is recognised on every storage (with or
without a heartbeat, with or without an owner) and failed, and resume reaches exactly --trials."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mpsearch.engine.loop import has_record
from mpsearch.engine.storage import make_storage

SLOW_TASK = f"{Path(__file__).parents[1] / 'slow_digits.py'}:build"
CLI = [sys.executable, "-m", "mpsearch.cli"]


def study_of(url: str, name: str | None = None) -> optuna.Study | None:
    names = optuna.study.get_all_study_names(make_storage(url))
    if not names:
        return None
    return optuna.load_study(study_name=name or names[0], storage=make_storage(url))


def recorded(study: optuna.Study) -> list[int]:
    """The trials holding a finished trial's whole record."""
    return sorted(t.number for t in study.get_trials() if has_record(t))


def result_numbers(out: Path) -> list[int]:
    return [t["number"] for t in json.loads((out / "result.json").read_text())["trials"]]


# a process that asks the study for a trial and dies holding it: before naming itself (no owner),
# after (an owner that is gone), or half-way through telling it (part of its record written);
# none ever records a heartbeat
ASK_AND_DIE = """
import os, sys, optuna
from mpsearch.engine.storage import make_storage
from mpsearch.engine.loop import OWNER_ATTR
from mpsearch.outlock import this_process
study = optuna.load_study(study_name="m", storage=make_storage(sys.argv[1]))
trial = study.ask(study.trials[0].distributions)
if sys.argv[2] in ("owner", "halfway"):
    trial.set_user_attr(OWNER_ATTR, this_process())
if sys.argv[2] == "halfway":  # the state among the first attributes, as an older mpsearch wrote them
    trial.set_user_attr("state", "complete")
    trial.set_user_attr("latency_ms", 0.5)
os._exit(9)
"""


def test_resume_fails_trials_whose_process_died_before_its_first_heartbeat(tmp_path):
    """Trials asked by a process killed before its first heartbeat stayed RUNNING forever on SQLite:
    each counted towards --trials and every resume waited 300 s for them (silently with
    --no-progress). Now the one with a dead owner is failed at once and the one with no owner
    after ORPHAN_GRACE_S; the resume completes exactly --trials and says what it waited for."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    out = tmp_path / "o"
    args = [*CLI, "search", "--task", "digits", "--strategy", "optuna", "--seed", "0", "--storage", url,
            "--study-name", "m", "--out", str(out), "--no-mlflow", "--no-progress"]
    subprocess.run([*args, "--trials", "3"], check=True, capture_output=True, timeout=300)
    for how in ("owner", "none", "halfway"):
        subprocess.run([sys.executable, "-c", ASK_AND_DIE, url, how], check=False, timeout=120)
    running = study_of(url).get_trials(states=(TrialState.RUNNING,))
    assert [t.number for t in running] == [3, 4, 5]
    t0 = time.monotonic()
    p = subprocess.run([*args, "--trials", "6", "--resume"], check=False, capture_output=True, text=True, timeout=280)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    assert "failed 2 trials left running by a process that is gone (trials 3, 5)" in p.stderr
    assert "Traceback" not in p.stderr and "constraint value is ignored" not in p.stderr
    assert "waiting (up to 300 s) for 1 trial other processes are running" in p.stderr  # said with --no-progress
    assert took < 120, took  # the owner-less one is failed after ORPHAN_GRACE_S (20 s), not after 300 s
    study = study_of(url)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert len(recorded(study)) == 6
    assert result_numbers(out) == recorded(study)
    assert {t.number for t in study.get_trials(states=(TrialState.FAIL,))} >= {3, 4, 5}
    assert 5 not in recorded(study)  # its partial record is no record


@pytest.mark.parametrize("storage", ["journal", "sqlite"])
def test_killed_at_random_moments_resume_reaches_exactly_the_trials_asked_for(storage, tmp_path):
    """kill -9 three times at random moments (set-up, study creation, mid-trial), resuming in
    between; the last resume completes exactly --trials, result.json equal to the study."""
    n = 30
    out = tmp_path / "o"
    url = f"sqlite:///{tmp_path / 's.db'}" if storage == "sqlite" else f"journal:///{out / 'study.log'}"
    where = ["--storage", url, "--study-name", "m"] if storage == "sqlite" else []
    args = [*CLI, "search", "--task", SLOW_TASK, "--strategy", "optuna", "--seed", "0", "--trials", str(n),
            "--out", str(out), *where, "--no-mlflow", "--no-progress"]
    rng = random.Random(storage)
    exists = (tmp_path / "s.db") if storage == "sqlite" else (out / "study.log")

    def started() -> list[str]:
        return [*args, "--resume"] if exists.exists() and study_of(url) is not None else args

    kills = 0
    for _ in range(3):
        proc = subprocess.Popen(started(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + rng.uniform(3.0, 12.0)
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        else:  # it finished first (a loaded machine runs the set-up slower, an idle one the trials faster)
            assert proc.returncode == 0, proc.stderr.read()[-3000:]
        proc.wait(timeout=30)
        proc.stderr.close()
    assert kills >= 1
    t0 = time.monotonic()
    p = subprocess.run(started(), check=False, capture_output=True, text=True, timeout=280)
    assert p.returncode == 0, p.stderr[-3000:]
    assert time.monotonic() - t0 < 150
    study = study_of(url)
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert len(recorded(study)) == n
    assert result_numbers(out) == recorded(study)


# two processes open a new SQLite database at the same moment, round after round, and create a
# study each: both create the tables and the version row, and the later one once failed with an
# IntegrityError ("UNIQUE constraint failed: alembic_version") or "table ... already exists"
OPEN_AT_ONCE = """
import sys, time, optuna
from mpsearch.engine.storage import make_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
folder, me, t0, rounds = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
for i in range(rounds):
    time.sleep(max(0.0, t0 + 0.25 * i - time.time()))
    optuna.create_study(study_name=me, storage=make_storage(f"sqlite:///{folder}/db{i}.db", retries=0))
print("created", rounds)
"""


def test_processes_opening_a_new_sqlite_storage_at_once_both_get_it(tmp_path):
    rounds = 40
    t0 = time.time() + 8  # past both imports
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT_ONCE, str(tmp_path), me, str(t0), str(rounds)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for me in ("a", "b")]
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0 and out.split() == ["created", str(rounds)], err[-2000:]
    for i in range(rounds):
        assert sorted(optuna.study.get_all_study_names(f"sqlite:///{tmp_path}/db{i}.db")) == ["a", "b"]


def test_two_resumes_of_one_shared_study_together_run_exactly_its_trials(tmp_path):
    """--trials is the study's total, not each process's: two resumes of one study at once (each
    with its own --out) stop when the study holds --trials, and each result.json holds them all."""
    url = f"sqlite:///{tmp_path / 's.db'}"

    def args(out: str) -> list[str]:
        return [*CLI, "search", "--task", SLOW_TASK, "--strategy", "optuna", "--seed", "0", "--storage", url,
                "--study-name", "m", "--out", str(tmp_path / out), "--no-mlflow", "--no-progress"]

    subprocess.run([*args("a"), "--trials", "2"], check=True, capture_output=True, timeout=300)
    procs = [subprocess.Popen([*args(out), "--trials", "16", "--resume"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for out in ("a", "b")]
    errs = [p.communicate(timeout=280)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    study = study_of(url)
    assert len(recorded(study)) == 16
    assert result_numbers(tmp_path / "a") == result_numbers(tmp_path / "b") == recorded(study)
