"""The search loop: Optuna proposes (ask), the cost model prices, the evaluator scores, Optuna
learns (tell). Pricing is cheap and scoring is expensive: a candidate that breaks the latency
budget, or that the target cannot run, is told to the study as infeasible without scoring.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from hw_models import Candidate, CostModel
from mpsearch.errors import EvaluationError, InvalidConfigError, SearchInterrupted
from mpsearch.evaluator import Evaluator
from mpsearch.result import SearchResult, TrialRecord
from mpsearch.tracking import Tracker
from search_spaces import SearchSpace

SAMPLERS = ("tpe", "nsga2", "random")
# Constraint values told to the study with every trial (> 0 means violated); Optuna's
# constraint-aware samplers (TPE, NSGA-II) rank infeasible trials below feasible ones.
UNSUPPORTED = "unsupported_precision"  # 1.0 when the target cannot run a layer's precisions
OVER_BUDGET = "latency_over_budget_ms"  # latency minus budget, in ms


class _DeferredInterrupt:
    """Ctrl-C that waits for the end of a critical section (a trial being recorded).

    A SIGINT handler, not a signal mask: Python runs handlers in the main thread, so the
    check is exact even while torch or SQLite threads exist (a mask would not stop the
    kernel from delivering SIGINT to one of those threads).
    """

    def __init__(self) -> None:
        self.depth = 0
        self.pending = False
        self._old = None

    def _handler(self, signum, frame):
        if self.depth:
            self.pending = True
        else:
            raise KeyboardInterrupt

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)

    def restore(self) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)

    @contextmanager
    def critical(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending:
                self.pending = False
                raise KeyboardInterrupt


def _dominating_metric(trials: list[TrialRecord], latency_ms: float) -> float | None:
    """The best metric of the complete, feasible trials no slower than latency_ms (None: none)."""
    best = None
    for t in trials:
        if t.state == "complete" and t.feasible and t.latency_ms <= latency_ms and (best is None or t.metric > best):
            best = t.metric
    return best


def make_sampler(name: str | optuna.samplers.BaseSampler, seed: int | None, n_trials: int):
    """An Optuna sampler by name (tpe, nsga2, random), or the sampler object given."""
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "nsga2":
        population = max(10, min(50, n_trials // 4))
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    raise InvalidConfigError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")


def run_search(
    *,
    result: SearchResult,
    space: SearchSpace,
    cost_model: CostModel,
    evaluator: Evaluator,
    study: optuna.Study,
    n_trials: int,
    latency_budget_ms: float | None,
    out_dir: Path,
    tracker: Tracker | None,
    progress: bool = True,
    on_trial: Callable[[TrialRecord], None] | None = None,
    early_stop: bool = False,
) -> SearchResult:
    """Run n_trials trials, appending to result.trials; result.json is rewritten after each.

    early_stop: multi-fidelity scoring. A candidate is scored on part of the evaluation batches
    first and stopped ("pruned", its metric the estimate on those batches) when its metric
    cannot, with high confidence, reach the best metric of a complete trial at least as fast:
    it would be dominated (see Evaluator.score). The study is told the estimate.

    On Ctrl-C the trial in flight is told to the study as failed, every finished trial stays in
    result.json and in the study's storage, and KeyboardInterrupt propagates.
    """
    dists = space.distributions()
    # What the study should be told in place of a metric for an infeasible trial: worse than
    # anything a scored trial reports. Samplers that know constraints rank by those instead.
    floor = -abs(result.reference["fp32_metric"]) * 10 - 1.0
    first_trial_of: dict[Candidate, int] = {}
    result_path = out_dir / "result.json"
    bar = tqdm(total=n_trials, desc="search", unit="trial", file=sys.stderr, disable=not progress)
    trial = None
    interrupts = _DeferredInterrupt()
    try:
        interrupts.install()
        for _ in range(n_trials):
            t0 = time.perf_counter()
            with interrupts.critical():  # a trial created in the storage is always one we hold
                trial = study.ask(dists)
            candidate = space.candidate(trial.params)
            cost = cost_model.price(candidate)
            record = TrialRecord(
                number=trial.number,
                state="complete",
                config=candidate,
                metric=None,
                latency_ms=cost.latency_ms,
                weight_bytes=cost.weight_bytes,
                bops=cost.bops,
                feasible=cost.feasible,
                peak_act_bytes=cost.peak_act_bytes,
            )
            over_budget = 0.0 if latency_budget_ms is None else cost.latency_ms - latency_budget_ms
            if not cost.feasible:
                record.state, record.reason = "infeasible", cost.reason
            elif over_budget > 0:
                record.state, record.feasible = "infeasible", False
                record.reason = f"latency {cost.latency_ms:.4g} ms is over the budget of {latency_budget_ms:g} ms"
            else:
                record.duplicate_of = first_trial_of.get(candidate)
                threshold = _dominating_metric(result.trials, cost.latency_ms) if early_stop else None
                try:
                    score = evaluator.score(candidate, stop_below=threshold)
                    record.metric, record.proxies = score.metric, dict(score.proxies)
                    if score.fidelity < 1:
                        record.state, record.fidelity = "pruned", score.fidelity
                        record.reason = (
                            f"stopped after {score.fidelity:.0%} of the evaluation batches: "
                            f"{score.metric:.4g} there, at most {score.metric_upper:.4g} expected in "
                            f"full, below {threshold:.4g} of a trial at least as fast"
                        )
                except EvaluationError as e:
                    record.state, record.reason = "fail", str(e)
                first_trial_of.setdefault(candidate, trial.number)
            record.seconds = time.perf_counter() - t0
            with interrupts.critical():  # the study and result.json learn of the trial together
                trial.set_constraint(UNSUPPORTED, 0.0 if cost.feasible else 1.0)
                trial.set_constraint(OVER_BUDGET, over_budget if cost.feasible else 0.0)
                if record.state == "fail":
                    study.tell(trial, state=TrialState.FAIL)
                else:
                    metric = record.metric if record.state in ("complete", "pruned") else floor
                    study.tell(trial, [metric, record.latency_ms])
                trial = None
                result.trials.append(record)
                result.write(result_path)
            if tracker is not None:
                tracker.log_trial(record)
            if on_trial is not None:
                on_trial(record)
            best = result.best
            if best is not None:
                b = result.trial(best)
                bar.set_postfix(best=f"{b.metric:.4f}", latency_ms=f"{b.latency_ms:.4g}", refresh=False)
            bar.update(1)
    except KeyboardInterrupt:
        if trial is not None:
            try:
                study.tell(trial, state=TrialState.FAIL)
            except Exception:  # noqa: BLE001, S110 - storage may be mid-write; finished trials are safe
                pass
        result.interrupted = True
        result.write(result_path)
        if tracker is not None:
            tracker.finish(result, status="KILLED")
        done = len(result.trials)
        raise SearchInterrupted(
            f"{done} finished trial{'s' if done != 1 else ''} kept in {result_path} and in the study storage",
            str(result_path),
        ) from None
    finally:
        interrupts.restore()
        bar.close()
    result.write(result_path)
    if tracker is not None:
        tracker.finish(result)
    return result
