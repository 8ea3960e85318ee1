"""A search that ends in an error before any trial was scored or priced leaves nothing behind:
no study file, no result.json, no output directory it made itself (these were once left behind,
empty or holding only failed trials). One that finished a trial keeps everything."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

STAGE_LINE = re.compile(r"mpsearch: [^:]+(: done in [0-9.]+ s| \.\.\.)$")  # progress of a slow stage


def cli(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mpsearch.cli", *argv], capture_output=True, text=True,
                          timeout=600, check=False, **kw)


def one_line_error(rc, err, needle):
    lines = [x for x in err.splitlines() if x.strip() and not STAGE_LINE.match(x)]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("mpsearch: error: ") and needle in lines[0], lines[0]

NAN_CALIBRATION = """
from mpsearch.tasks.digits import build as digits
def build():
    t = digits()
    t.calib_batches = [b * float("nan") for b in t.calib_batches]
    return t
"""

# the metric raises from its (n+1)-th call on (the first call scores trial 0)
METRIC_FAILS_AFTER = """
import dataclasses
from mpsearch.tasks.digits import build as digits
calls = [0]
def metric(outputs, targets):
    calls[0] += 1
    if calls[0] > {n}:
        raise RuntimeError("label file went away")
    return 1.0
def build():
    return dataclasses.replace(digits(), metric_fn=metric)
"""

ERRORS = {
    "calibration": (NAN_CALIBRATION, "non-finite input to layer features.0"),
    "every trial": (METRIC_FAILS_AFTER.format(n=0), "label file went away"),
}


def search(tmp_path, task_file, out):
    return cli("search", "--task", f"{task_file}:build", "--strategy", "optuna", "--trials", "3", "--no-mlflow",
               "--no-progress", "--out", str(out), cwd=tmp_path)


@pytest.mark.parametrize("where", sorted(ERRORS))
def test_an_error_before_any_trial_finished_leaves_nothing_behind(where, tmp_path):
    code, message = ERRORS[where]
    f = tmp_path / "task.py"
    f.write_text(code)
    p = search(tmp_path, f, tmp_path / "new")
    one_line_error(p.returncode, p.stderr, message)
    assert not (tmp_path / "new").exists()
    # a directory the user made keeps what it held; only this run's files go
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    p = search(tmp_path, f, tmp_path / "mine")
    one_line_error(p.returncode, p.stderr, message)
    assert sorted(x.name for x in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_an_error_after_a_trial_finished_keeps_the_study_and_result(tmp_path):
    f = tmp_path / "task.py"
    f.write_text(METRIC_FAILS_AFTER.format(n=1))
    p = search(tmp_path, f, tmp_path / "o")
    one_line_error(p.returncode, p.stderr, "label file went away")
    trials = json.loads((tmp_path / "o" / "result.json").read_text())["trials"]
    assert trials[0]["state"] == "complete" and (tmp_path / "o" / "study.log").exists()
