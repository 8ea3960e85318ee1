"""One writer per output directory (mpsearch.outlock): real processes racing for one --out."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpsearch.errors import OutputDirError
from mpsearch.outlock import LOCK_NAME, OutputLock

CLI = [sys.executable, "-m", "mpsearch.cli"]
SLOW_TASK = f"{Path(__file__).with_name('slow_digits.py')}:build"


def refused(p: subprocess.CompletedProcess, *needles: str) -> None:
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [x for x in p.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_a_second_search_on_a_busy_output_is_refused_naming_the_first(tmp_path):
    """Two searches started seconds apart on one --out once both exited 0, result.json holding
    only the later one's trials."""
    out = tmp_path / "out"
    first = subprocess.Popen([*CLI, "search", "--task", SLOW_TASK, "--strategy", "optuna", "--trials", "12",
                              "--seed", "0", "--out", str(out), "--no-mlflow", "--no-progress"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.05)
        owner = json.loads((out / LOCK_NAME).read_text())
        assert owner["pid"] == first.pid and owner["command"] == "mpsearch search"
        second = subprocess.run([*CLI, "search", "--task", "digits", "--trials", "3", "--out", str(out), "--no-mlflow",
                                 "--no-progress"], capture_output=True, text=True, timeout=300, check=False)
        refused(second, f"output directory {out.resolve()} is in use by mpsearch search (pid {first.pid}",
                "another --out")
        _, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-2000:]
    d = json.loads((out / "result.json").read_text())
    assert len(d["trials"]) == 12 and d["task"].endswith("slow_digits.py:build")  # the first search's, whole
    assert not (out / LOCK_NAME).exists()  # released at the end


def test_a_held_output_refuses_search_compare_and_verify(tmp_path):
    out = tmp_path / "out"
    assert subprocess.run([*CLI, "search", "--task", "digits", "--trials", "3", "--strategy", "optuna", "--out",
                           str(out), "--no-mlflow", "--no-progress"], capture_output=True, timeout=300,
                          check=False).returncode == 0
    before = (out / "result.json").read_bytes()
    with OutputLock(out, "a test holding it"):
        for argv in (["search", "--task", "digits", "--trials", "2"],
                     ["compare", "--task", "digits", "--targets", "x86-vnni,h100", "--trials", "2"]):
            p = subprocess.run([*CLI, *argv, "--out", str(out), "--no-mlflow", "--no-progress"], capture_output=True,
                               text=True, timeout=300, check=False)
            refused(p, "is in use by a test holding it", f"(pid {os.getpid()} on")
        p = subprocess.run([*CLI, "verify", str(out), "--no-progress"], capture_output=True, text=True, timeout=300,
                           check=False)
        refused(p, "is in use by a test holding it")
        with OutputLock(out, "the same process again"):  # re-entrant within a process
            pass
        assert (out / LOCK_NAME).exists()
    assert not (out / LOCK_NAME).exists()
    assert (out / "result.json").read_bytes() == before  # nothing written by the refused runs


def test_a_dead_process_lock_is_taken_over_and_another_hosts_is_not(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(),
                                             "command": "mpsearch search", "started": "2026-01-01T00:00:00"}))
    p = subprocess.run([*CLI, "search", "--task", "digits", "--trials", "2", "--strategy", "optuna", "--out", str(out),
                        "--no-mlflow", "--no-progress"], capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(json.loads((out / "result.json").read_text())["trials"]) == 2 and not (out / LOCK_NAME).exists()

    (out / LOCK_NAME).write_text(json.dumps({"pid": 4242, "host": "elsewhere.example", "command": "mpsearch search",
                                             "started": "2026-01-01T00:00:00"}))
    with pytest.raises(OutputDirError, match=f"pid 4242 on elsewhere.example.*remove {out.resolve() / LOCK_NAME}"):
        OutputLock(out, "x").acquire()
    (out / LOCK_NAME).write_text("{half-writ")  # a lock being written right now: busy, not stale
    with pytest.raises(OutputDirError, match="in use by an mpsearch starting"):
        OutputLock(out, "x").acquire()
