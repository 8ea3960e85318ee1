"""Where candidates are scored. The search loop (mpsearch.engine.loop.run_search) asks, prices and
tells on the driver; an executor scores the candidates worth scoring, one at a time in this
process (LocalExecutor) or several at once on Ray actors (mpsearch.executors.ray_executor, the
only module that imports Ray).

An executor has `slots` (scorings in flight at once), `submit(key, candidate, stop_below)` and
`wait()`, which blocks until at least one submitted scoring finishes and returns their Outcomes.

May import: errors, cache, tasks, scoring
"""

from __future__ import annotations

import os
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Protocol

from hw_models import Candidate
from mpsearch.errors import EvaluationError
from mpsearch.scoring.evaluator import Evaluator, Score

THIS_PROCESS = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class Outcome:
    """A finished scoring: the Score, or why there is none (error: the evaluator's message, or
    the worker's death after its retries); seconds: scoring time where it ran; worker: host:pid
    of the process that scored it."""

    key: int
    score: Score | None
    error: str | None = None
    seconds: float = 0.0
    worker: str = ""


class Executor(Protocol):
    slots: int  # scorings in flight at once
    workers: int  # processes scoring

    def submit(self, key: int, candidate: Candidate, stop_below: float | None) -> None: ...

    def wait(self) -> list[Outcome]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Scores in this process, one candidate at a time (the default)."""

    slots = 1
    workers = 1

    def __init__(self, evaluator: Evaluator):
        self.evaluator = evaluator
        self._queue: deque[tuple[int, Candidate, float | None]] = deque()

    def submit(self, key: int, candidate: Candidate, stop_below: float | None) -> None:
        self._queue.append((key, candidate, stop_below))

    def wait(self) -> list[Outcome]:
        key, candidate, stop_below = self._queue.popleft()
        return [score_outcome(self.evaluator, key, candidate, stop_below)]

    def close(self) -> None:
        self._queue.clear()


def score_outcome(evaluator: Evaluator, key: int, candidate: Candidate, stop_below: float | None) -> Outcome:
    """Score one candidate; an EvaluationError becomes the Outcome's error."""
    t0 = time.perf_counter()
    try:
        score = evaluator.score(candidate, stop_below=stop_below)
    except EvaluationError as e:
        return Outcome(key, None, str(e), time.perf_counter() - t0, THIS_PROCESS)
    return Outcome(key, score, None, time.perf_counter() - t0, THIS_PROCESS)
