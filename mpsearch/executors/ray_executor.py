"""Scoring on a Ray cluster: long-lived actors, each holding the task and its Evaluator.

Why actors fed by the driver's Optuna study (ask/tell), not Ray Tune with OptunaSearch:
- pricing stays on the driver: a candidate over budget, or one the target cannot run, costs
  microseconds there and never travels; only candidates worth scoring go to a worker;
- one loop for local and distributed searches (mpsearch.engine.loop.run_search): the same
  result.json, resume, duplicate reuse, early stopping, and MLflow logged by the driver alone;
- the configurations proposed are reproducible with a seed: the loop tells trials in the order
  they were asked and asks trial k right after telling trial k - workers, whatever order the
  workers finish in (Tune's searcher asks whenever a slot frees, so its proposals depend on
  timing);
- the per-trial overhead is one actor call (about a millisecond), where Tune's per-trial
  bookkeeping (trial objects, result dirs, callbacks) would dwarf a 20 ms digits trial.

Each actor builds its task, analysis and Evaluator once (from the evaluator's disk cache when the
driver on the same machine already calibrated) and then scores candidate after candidate.

Fault tolerance: actors restart when their process dies (max_restarts=-1) and Ray re-runs the
call they were scoring up to `retries` times; past that the trial is recorded as failed ("worker
died ...") and the search goes on. A worker that cannot be rebuilt is dropped; the search stops,
keeping every finished trial, only when none is left.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections import deque
from pathlib import Path

from hw_models import Candidate
from mpsearch.errors import ClusterError, MissingDependencyError
from mpsearch.executors import Outcome, score_outcome
from mpsearch.scoring.evaluator import QuantSettings
from mpsearch.tasks import Task

READY_TIMEOUT_S = 600.0  # building the task on a worker (a cold evaluator cache included)
CONNECT_TIMEOUT_S = 5.0
DEATHS_BEFORE_DROP = 3  # a worker whose calls die this many times in a row is dropped


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependencyError("--backend ray needs Ray: pip install 'mpsearch[ray]'") from None
    return ray


def token_available() -> bool:
    """Whether this machine has a Ray authentication token (RAY_AUTH_TOKEN, the file named by
    RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
    return Path(path).is_file()


def _token_mode(address: str | None) -> None:
    """Joining a cluster with RAY_AUTH_MODE unset and a token at hand: use token authentication
    (a client in token mode also joins a cluster without authentication)."""
    if address is None or "RAY_AUTH_MODE" in os.environ or not token_available():
        return
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:  # Ray reads the mode when imported: refresh it, as Ray itself does
        try:
            from ray._raylet import Config

            Config.initialize("")
        except Exception:  # noqa: BLE001, S110 - an older Ray without token authentication
            pass


def _check_reachable(address: str) -> None:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ClusterError(f"--ray-address {address!r}: expected auto or HOST:PORT (the address `ray start "
                           "--head` prints)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as e:
        raise ClusterError(f"cannot reach the Ray cluster at {address} ({e.strerror or e}): is `ray start --head` "
                           "running there, and is the port open?") from None


def preflight(address: str | None) -> None:
    """Fail fast, before any costly set-up: Ray is installed and the cluster's port answers."""
    _token_mode(address)
    _import_ray()
    if address not in (None, "auto"):
        _check_reachable(address)


def connect(address: str | None, cpus: int | None) -> bool:
    """Join the Ray cluster at `address` (HOST:PORT or "auto"), or start a local instance of
    `cpus` CPUs (default: this machine's); True when this call started or joined Ray (and the
    executor should disconnect at the end), False when Ray was already initialized here.

    Ray 2.52+ clusters use token authentication when their head had a token: if RAY_AUTH_MODE
    is unset and this machine has a token, joining uses it (RAY_AUTH_MODE=token).
    """
    ray = _import_ray()
    if ray.is_initialized():
        return False
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING,
              "configure_logging": True}
    if address is None:
        # a new local instance turns token authentication on (Ray 2.52+) and says so: not news here
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(num_cpus=cpus or os.cpu_count(), **kwargs)
        return True
    if address != "auto":
        _check_reachable(address)
    _token_mode(address)
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ray.exceptions.AuthenticationError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = "" if os.environ.get("RAY_AUTH_MODE") == "token" else (
            "; if the cluster uses token authentication, set RAY_AUTH_MODE=token and provide its token "
            "(~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)")
        raise ClusterError(f"cannot join the Ray cluster at {address}: {first.split('. ')[0]}{hint}") from None
    return True


class _Scorer:
    """A Ray actor: the task and its Evaluator, built once, scoring candidate after candidate."""

    def __init__(self, task: Task | str, quant: QuantSettings, cache: bool, threads: int):
        import torch

        from mpsearch.cache import cache_dir
        from mpsearch.scoring.analysis import analyze
        from mpsearch.scoring.evaluator import Evaluator
        from mpsearch.tasks import load_task

        torch.set_num_threads(threads)
        task_obj = load_task(task) if isinstance(task, str) else task
        analysis = analyze(task_obj.model, task_obj.example_input)
        self.evaluator = Evaluator(task_obj, analysis, quant, cache_dir=cache_dir("evaluator") if cache else None)

    def ready(self) -> tuple[int, str]:
        return os.getpid(), socket.gethostname()

    def score(self, key: int, candidate: Candidate, stop_below: float | None) -> Outcome:
        return score_outcome(self.evaluator, key, candidate, stop_below)


class RayExecutor:
    """Scores on `workers` Ray actors of `threads` torch threads (one CPU each per thread).

    task: a task name or reference (each worker loads it; a file.py:function path must exist on
    every node) or a Task object (sent to the workers). retries: how many times a trial whose
    worker died is run again before it is recorded as failed.
    """

    def __init__(self, task: Task | str, quant: QuantSettings, *, address: str | None = None,
                 workers: int | None = None, threads: int = 1, retries: int = 1, cache: bool = True,
                 progress: bool = True):
        self.ray = ray = _import_ray()
        self._owns = False
        if isinstance(task, str) and ":" in task:  # a file path must not depend on a worker's cwd
            where, _, fn = task.rpartition(":")
            if where.endswith(".py") and Path(where).is_file():
                task = f"{Path(where).resolve()}:{fn}"
        self._owns = connect(address, None if workers is None else workers * threads)
        try:
            cpus = int(ray.cluster_resources().get("CPU", 0))
            self.workers = workers or max(1, cpus // threads)
            if self.workers * threads > cpus:
                raise ClusterError(f"{self.workers} workers of {threads} thread{'s' if threads > 1 else ''} need "
                                   f"{self.workers * threads} CPUs; the Ray cluster has {cpus}")
            self.retries = retries
            ray.method(max_task_retries=-1)(_Scorer.ready)  # waits out a restart, however many
            self._scorer = ray.remote(_Scorer).options(num_cpus=threads, max_restarts=-1,
                                                       max_task_retries=retries)
            self._args = (task, quant, cache, threads)
            if progress:
                where = "a local Ray instance" if address is None else f"the Ray cluster at {address}"
                print(f"mpsearch: starting {self.workers} Ray worker{'s' if self.workers > 1 else ''} on {where}",
                      file=sys.stderr)
            t0 = time.perf_counter()
            self._actors = [self._scorer.remote(*self._args) for _ in range(self.workers)]
            self._ready(self._actors)
            self.startup_s = time.perf_counter() - t0
        except BaseException:
            self.close()
            raise
        self.slots = self.workers
        self._idle: deque = deque(self._actors)
        self._running: dict = {}  # ObjectRef -> (key, actor)
        self._backlog: deque = deque()
        self._deaths: dict = {}  # actor -> calls died in a row
        self._reviving: dict = {}  # ObjectRef of ready() -> an actor restarting after its death

    def _ready(self, actors: list) -> None:
        ray = self.ray
        try:
            ray.get([a.ready.remote() for a in actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"the Ray workers were not ready within {READY_TIMEOUT_S:.0f} s (does the cluster "
                               "have free CPUs?)") from None
        except ray.exceptions.RayActorError as e:
            raise ClusterError(f"a Ray worker could not build the task: {_first_line(e)}") from None

    def submit(self, key: int, candidate: Candidate, stop_below: float | None) -> None:
        self._backlog.append((key, candidate, stop_below))
        self._dispatch()

    def _dispatch(self) -> None:
        while self._backlog and self._idle:
            key, candidate, stop_below = self._backlog.popleft()
            actor = self._idle.popleft()
            ref = actor.score.remote(key, candidate, stop_below)
            self._running[ref] = (key, actor)

    def wait(self) -> list[Outcome]:
        """The next finished scorings ([] when only a restarted worker came back)."""
        ray = self.ray
        if not self._running and not self._reviving:
            raise ClusterError("every Ray worker died or was dropped")
        done, _ = ray.wait([*self._running, *self._reviving], num_returns=1)
        outcomes = []
        for ref in done:
            if ref in self._reviving:  # a worker restarted after dying: it takes work again
                actor = self._reviving.pop(ref)
                try:
                    ray.get(ref)
                    self._idle.append(actor)
                except ray.exceptions.RayActorError as e:
                    self._drop(actor, f"it cannot restart ({_first_line(e)})")
                continue
            key, actor = self._running.pop(ref)
            try:
                outcomes.append(ray.get(ref))
                self._deaths.pop(actor, None)
                self._idle.append(actor)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError) as e:
                again = f"run {self.retries + 1} times, " if self.retries else ""
                outcomes.append(Outcome(key, None, f"worker died ({_first_line(e)}); {again}recorded as failed"))
                self._deaths[actor] = self._deaths.get(actor, 0) + 1
                if self._deaths[actor] >= DEATHS_BEFORE_DROP:
                    self._drop(actor, f"it died {DEATHS_BEFORE_DROP} times in a row")
                else:  # no new work until it is back (a call to a restarting actor fails at once)
                    self._reviving[actor.ready.remote()] = actor
        self._dispatch()
        return outcomes

    def _drop(self, actor, why: str) -> None:
        print(f"mpsearch: dropping a Ray worker: {why}", file=sys.stderr)
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001, S110 - already gone
            pass
        self.slots = max(1, self.slots - 1)

    def close(self) -> None:
        ray = self.ray
        for actor in getattr(self, "_actors", []):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001, S110 - already gone
                pass
        self._actors = []
        if self._owns and ray.is_initialized():
            ray.shutdown()
        self._owns = False


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "File ", "ray::")):
            return line[:300]
    return type(e).__name__


def run_on_resource(fn, args: tuple, kwargs: dict, *, resource: str, address: str | None,
                    cpus: int | None) -> tuple[object, str]:
    """fn(*args, **kwargs) on a node of the Ray cluster at `address` that carries a custom resource
    named `resource` (a target name: `ray start ... --resources '{"x86-vnni": 1}'` on the machines
    of that kind), holding `cpus` of its CPUs; returns (fn's result, where it ran). Without a
    cluster address, or when no node carries the resource, fn runs in this process and the second
    value says so. `mpsearch verify --backend ray` measures deployed graphs this way."""
    if address is None:
        return fn(*args, **kwargs), "this machine (no --ray-address: no cluster of target machines to measure on)"
    ray = _import_ray()
    owns = connect(address, None)
    try:
        if ray.cluster_resources().get(resource, 0) >= 1:
            remote = ray.remote(num_cpus=cpus or 1, resources={resource: 1}, max_retries=0)(fn)
            try:
                out = ray.get(remote.remote(*args, **kwargs))
            except ray.exceptions.RayTaskError as e:
                cause = e.cause if getattr(e, "cause", None) is not None else e
                raise cause from None
            host = out.get("where", {}).get("host", "?") if isinstance(out, dict) else "?"
            return out, f"Ray node {host}, which carries the resource {resource!r}"
        note = (f"this machine: no node of the Ray cluster at {address} carries a resource named {resource!r} "
                f"(start target machines with --resources '{{\"{resource}\": 1}}')")
    finally:
        if owns and ray.is_initialized():
            ray.shutdown()
    return fn(*args, **kwargs), note
