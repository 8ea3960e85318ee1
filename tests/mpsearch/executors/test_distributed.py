"""Distributed search: a real Ray cluster (`ray start --head --block`, stopped by its PID), Ray
workers killed mid-search, and `mpsearch worker` processes sharing one Optuna storage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

SLOW_TASK = f"{Path(__file__).parents[1] / 'slow_digits.py'}:build"
CLI = [sys.executable, "-m", "mpsearch.cli"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, free_port, ray_head_factory):
    """A 2-CPU Ray head with token authentication (conftest.ray_head); yields (address, the
    environment a driver needs to join it, the folder workers mark their pids in)."""
    marks = tmp_path_factory.mktemp("pids")
    with ray_head_factory(free_port(), env={"MPSEARCH_TEST_PIDS": str(marks)}) as (address, env):
        yield address, env, marks


def search(*args: str, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "search", *args, "--no-mlflow", "--no-progress"], capture_output=True, text=True,
                          env=env, timeout=timeout, check=False)


def trials(out: Path) -> list[dict]:
    return json.loads((out / "result.json").read_text())["trials"]


def test_search_on_a_cluster_is_reproducible_and_shaped_like_a_local_one(cluster, tmp_path):
    address, env, _ = cluster
    common = ["--task", "digits", "--strategy", "optuna", "--trials", "10", "--seed", "0"]
    runs = []
    for name in ("a", "b"):
        p = search(*common, "--backend", "ray", "--ray-address", address, "--workers", "2",
                   "--out", str(tmp_path / name), env=env)
        assert p.returncode == 0, p.stderr[-3000:]
        runs.append(trials(tmp_path / name))
    assert [t["number"] for t in runs[0]] == list(range(10))
    # the same seed proposes the same configurations, whatever order the two workers finish in
    assert [t["config"] for t in runs[0]] == [t["config"] for t in runs[1]]
    scored_by = {t["worker"] for t in runs[0] if t["state"] == "complete"}
    assert len(scored_by) == 2  # both workers scored
    p = search(*common, "--out", str(tmp_path / "local"))
    assert p.returncode == 0, p.stderr[-3000:]
    ray_json = json.loads((tmp_path / "a" / "result.json").read_text())
    local_json = json.loads((tmp_path / "local" / "result.json").read_text())
    assert ray_json.keys() == local_json.keys()
    assert ray_json["trials"][0].keys() == local_json["trials"][0].keys()
    assert ray_json["settings"]["backend"] == "ray" and ray_json["settings"]["workers"] == 2
    # scores do not depend on where they were computed
    by_config = {json.dumps(t["config"], sort_keys=True): t["metric"] for t in local_json["trials"]}
    for t in ray_json["trials"]:
        key = json.dumps(t["config"], sort_keys=True)
        if key in by_config and t["state"] == "complete":
            assert t["metric"] == pytest.approx(by_config[key], abs=1e-9)


@pytest.mark.parametrize("retries", [1, 0])
def test_a_worker_killed_mid_trial_loses_nothing(cluster, tmp_path, retries):
    address, env, marks = cluster
    for f in marks.iterdir():
        f.unlink()
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [*CLI, "search", "--task", SLOW_TASK, "--strategy", "optuna", "--trials", "14", "--seed", "0",
         "--backend", "ray", "--ray-address", address, "--workers", "2", "--retries", str(retries),
         "--out", str(out), "--no-mlflow", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 240
        victim = None
        while time.time() < deadline and proc.poll() is None and victim is None:
            done = len(trials(out)) if (out / "result.json").exists() else 0
            if done >= 3:
                # a worker inside an evaluation forward pass right now (touched < 30 ms ago)
                recent = [f for f in marks.iterdir() if time.time() - f.stat().st_mtime < 0.03]
                if recent:
                    victim = int(recent[0].name)
                    os.kill(victim, signal.SIGKILL)
            time.sleep(0.005)
        assert victim is not None, "no worker was caught mid-trial"
        _, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    got = trials(out)
    assert [t["number"] for t in got] == list(range(14))  # no finished trial lost, the search went on
    failed = [t for t in got if t["state"] == "fail"]
    if retries:
        assert not failed  # the trial in flight ran again on the restarted worker
        assert len({t["worker"] for t in got if t["state"] == "complete"}) >= 3
    else:
        assert len(failed) == 1 and "worker died" in failed[0]["reason"]
        assert sum(t["state"] == "complete" for t in got) == 13


def start_shared_search(storage: str, name: str, n: int, out: Path) -> subprocess.Popen:
    """A search of the slow task in a shared storage, returned once it has created the study."""
    creator = subprocess.Popen(
        [*CLI, "search", "--task", SLOW_TASK, "--strategy", "optuna", "--trials", str(n), "--storage", storage,
         "--study-name", name, "--out", str(out), "--no-mlflow", "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "result.json").exists():
        assert creator.poll() is None and time.time() < deadline, creator.stderr.read()[-3000:]
        time.sleep(0.1)
    return creator


def test_storage_workers_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    creator = start_shared_search(storage, "shared", 40, tmp_path / "a")
    worker = subprocess.run([*CLI, "worker", "--storage", storage, "--study-name", "shared", "--task", SLOW_TASK, "--out",
                             str(tmp_path / "b"), "--no-progress"], capture_output=True, text=True, timeout=300,
                            check=False)
    _, err = creator.communicate(timeout=300)
    assert creator.returncode == 0, err[-3000:]
    assert worker.returncode == 0, worker.stderr[-3000:]
    a, b = trials(tmp_path / "a"), trials(tmp_path / "b")
    # every trial of the study, whoever ran it (two processes may both ask the 40th: one more)
    assert [t["number"] for t in a] == list(range(len(a))) and len(a) in (40, 41)
    assert [t["config"] for t in a] == [t["config"] for t in b]
    assert len({t["worker"] for t in a}) == 2  # both processes ran trials


def test_cluster_errors_are_one_line(tmp_path, free_port):
    p = search("--task", "digits", "--backend", "ray", "--ray-address", f"127.0.0.1:{free_port()}",
               "--out", str(tmp_path / "x"))
    assert p.returncode == 2 and "cannot reach the Ray cluster" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    p = search("--task", "digits", "--workers", "2", "--out", str(tmp_path / "y"))
    assert p.returncode == 2 and "needs the ray backend" in p.stderr
    p = subprocess.run([*CLI, "worker", "--storage", f"sqlite:///{tmp_path / 'none.db'}"], capture_output=True,
                       text=True, timeout=120, check=False)
    assert p.returncode == 2 and "no study yet" in p.stderr


def test_local_ray_instance(tmp_path):
    stale = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    existed = stale.exists()
    p = search("--task", "digits", "--strategy", "optuna", "--trials", "6", "--backend", "ray", "--workers", "2",
               "--out", str(tmp_path / "o"))
    assert p.returncode == 0, p.stderr[-3000:]
    assert len(trials(tmp_path / "o")) == 6
    assert "Token authentication" not in p.stderr  # Ray's notice about its own default is not shown
    assert json.loads((tmp_path / "o" / "result.json").read_text())["settings"]["workers"] == 2
    assert existed or not stale.exists()  # the local instance cleaned up after itself


def test_a_storage_worker_killed_mid_trial_has_its_trial_run_again(tmp_path):
    """RDB storages keep heartbeats: the dead worker's trial is failed after the grace period and
    enqueued again, and the search that created the study runs it."""
    import optuna

    from mpsearch.engine.storage import make_storage

    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    marks = tmp_path / "pids"
    marks.mkdir()
    creator = start_shared_search(storage, "k", 60, tmp_path / "a")
    deadline = time.time() + 120
    worker = subprocess.Popen([*CLI, "worker", "--storage", storage, "--study-name", "k", "--task", SLOW_TASK, "--out",
                               str(tmp_path / "b"), "--no-progress"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "MPSEARCH_TEST_PIDS": str(marks)})
    try:
        victim, first_seen = None, None
        while victim is None and time.time() < deadline + 120 and worker.poll() is None:
            recent = [f for f in marks.iterdir() if time.time() - f.stat().st_mtime < 0.03]
            if recent and first_seen is None:
                first_seen = time.time()
            if recent and time.time() - first_seen > 1.0:  # past its set-up, inside a trial's forward pass
                victim = int(recent[0].name)
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.005)
        assert victim == worker.pid, "the worker was not caught mid-trial"
        _, err = creator.communicate(timeout=300)
    finally:
        for p in (creator, worker):
            if p.poll() is None:
                p.kill()
    assert creator.returncode == 0, err[-3000:]
    got = trials(tmp_path / "a")
    assert len(got) in (60, 61) and all(t["state"] == "complete" for t in got)
    study = optuna.load_study(study_name="k", storage=make_storage(storage))
    dead = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(dead) == 1 and "mpsearch.record" not in dead[0].user_attrs  # the killed one, never recorded
    again = [t for t in study.trials if t.system_attrs.get("failed_trial") == dead[0].number]
    assert len(again) == 1 and again[0].params == dead[0].params  # the same configuration, run again
    assert again[0].number in {t["number"] for t in got}
