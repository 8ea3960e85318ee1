"""The search loop: the strategy's seeds, then the refiner (a budgeted hybrid search) or Optuna's
sampler propose (ask), the cost model prices, the evaluator scores, Optuna learns (tell). Pricing is cheap and scoring is expensive: a candidate that breaks a budget, or
that the target cannot run, is told to the study as infeasible without scoring.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import optuna
from optuna.trial import FrozenTrial, TrialState
from tqdm import tqdm

from hw_models import Candidate, CostModel
from mpsearch.defaults import SAMPLERS
from mpsearch.engine.budgets import NO_BUDGETS, Budgets
from mpsearch.engine.refine import Refiner
from mpsearch.errors import InvalidConfigError, MpsearchError, SearchInterrupted
from mpsearch.executors import THIS_PROCESS, Executor, LocalExecutor, Outcome
from mpsearch.outlock import process_gone, this_process
from mpsearch.results.objectives import DEFAULT_OBJECTIVES
from mpsearch.results.objectives import value as objective_value
from mpsearch.results.records import SearchResult, TrialRecord, speedup
from mpsearch.results.tracking import Tracker
from mpsearch.scoring.evaluator import Evaluator, Score
from search_spaces import SearchSpace

# Constraint values told to the study with every trial (> 0 means violated); Optuna's
# constraint-aware samplers (TPE, NSGA-II/III, GP) rank infeasible trials below feasible ones.
UNSUPPORTED = "unsupported_precision"  # 1.0 when the target cannot run a layer's precisions
# Each finished trial's TrialRecord lives in the study as user attributes, one per field (what a
# dashboard shows, and what a resumed search reads back; the configuration is the trial's params):
# `state`, `metric`, `latency_ms`, ..., `proxy.<name>`, plus `speedup_fp32`, `mean_weight_bits` and
# `mean_activation_bits` to read. RECORD_ATTR: studies written before kept it as one JSON attribute.
STATE_ATTR = "state"
RECORD_ATTR = "mpsearch.record"
PROXY_PREFIX = "proxy."
# a trial's 95% confidence intervals (TrialRecord.intervals) as two numbers each, "ci95_low.metric"
CI_LOW, CI_HIGH = "ci95_low.", "ci95_high."
_DERIVED_ATTRS = ("speedup_fp32", "mean_weight_bits", "mean_activation_bits")
GATHER_TIMEOUT_S = 300.0  # how long a search waits for other processes' trials on a shared study
OWNER_ATTR = "mpsearch.owner"  # a running trial's process (outlock.this_process): a dead one's trial is failed
ORPHAN_GRACE_S = 20.0  # a running trial that names no owner this long after it started is an orphan


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


def _dominating_metric(trials: list[TrialRecord], record: TrialRecord, costs: Sequence[str]) -> float | None:
    """The best metric of the complete, feasible trials no costlier than `record` in every cost
    objective (None: none): a candidate that cannot beat it would be dominated."""
    best = None
    mine = [objective_value(record, c) for c in costs]
    for t in trials:
        if t.state != "complete" or not t.feasible or (best is not None and t.metric <= best):
            continue
        if all(objective_value(t, c) <= m for c, m in zip(costs, mine, strict=True)):
            best = t.metric
    return best


def make_sampler(name: str | optuna.samplers.BaseSampler, seed: int | None, n_trials: int):
    """An Optuna sampler by name (see SAMPLERS), or the sampler object given.

    tpe: multivariate TPE; nsga2 / nsga3: genetic, population n_trials / 4 within [10, 50];
    random; qmc: scrambled Sobol (on categorical parameters Optuna samples independently, so it
    behaves like random there); gp: Gaussian-process Bayesian optimization. Every one of them
    reads the constraints told with each trial.
    """
    if isinstance(name, optuna.samplers.BaseSampler):
        return name
    population = max(10, min(50, n_trials // 4))
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True)
    if name == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    with warnings.catch_warnings():  # "experimental" since Optuna 3; the user asked for it by name
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        if name == "nsga3":
            return optuna.samplers.NSGAIIISampler(seed=seed, population_size=population)
        if name == "qmc":
            return optuna.samplers.QMCSampler(seed=seed, scramble=True, warn_independent_sampling=False,
                                              warn_asynchronous_seeding=False)
    if name == "gp":
        return optuna.samplers.GPSampler(seed=seed, warn_independent_sampling=False)
    raise InvalidConfigError(f"unknown sampler {name!r} (known: {', '.join(SAMPLERS)})")


@dataclass
class _Pending:
    """A trial asked and priced, not yet told: its score is on the way (`ready` False), or it
    needs none (priced only, or a repeat of a scored configuration), or it waits for the trial
    in flight with the same configuration (`waits_for`)."""

    trial: optuna.Trial
    t0: float
    t1: float = 0.0
    record: TrialRecord | None = None
    feasible: bool = True
    overruns: dict[str, float] = field(default_factory=dict)
    ready: bool = False
    threshold: float | None = None
    waits_for: int | None = None
    heartbeat: object = None


def run_search(
    *,
    result: SearchResult,
    space: SearchSpace,
    cost_model: CostModel,
    evaluator: Evaluator | None,
    study: optuna.Study,
    n_trials: int,
    out_dir: Path,
    tracker: Tracker | None,
    budgets: Budgets = NO_BUDGETS,
    objectives: Sequence[str] = DEFAULT_OBJECTIVES,
    seeds: Iterable[Candidate] = (),
    seeds_only: bool = False,
    progress: bool = True,
    on_trial: Callable[[TrialRecord], None] | None = None,
    early_stop: bool = False,
    executor: Executor | None = None,
    study_total: int | None = None,
    gather: bool = False,
    heartbeats: Heartbeats | None = None,
    refiner: Refiner | None = None,
) -> SearchResult:
    """Run up to n_trials more trials, appending to result.trials; result.json is rewritten after
    each, and each finished trial's record is kept in the study (user attribute RECORD_ATTR).
    The loop itself is TrialLoop (its steps: ask, price, dispatch, on_outcome, tell, publish).

    Each trial: the study proposes a candidate (the next of `seeds` while there are any: they are
    enqueued one at a time, so an exhaustive enumeration costs no storage up front; then the
    sampler), the cost model prices it, and only a candidate the target runs within every budget
    is scored. The study is told [metric, *costs] in `objectives` order and one constraint per
    budget (plus UNSUPPORTED); an infeasible candidate is told a metric below any real one.
    seeds_only: stop when the seeds run out (the ilp and exhaustive strategies). refiner: once the
    seeds are used, it proposes (the budget's neighbourhood; the sampler when it has nothing) and
    ends the search when its patience runs out (mpsearch.engine.refine; settings.stopped_early).

    executor: where candidates are scored (default: LocalExecutor(evaluator), one at a time).
    With `executor.slots` = W scorings in flight, trials are told in the order they were asked and
    trial k is asked right after trial k - W is told, so the study has seen exactly the same
    trials at every ask whatever order the scorings finish in: with a seeded sampler the
    configurations proposed do not depend on timing. A configuration already in flight is not
    scored twice: its repeat waits for it.
    study_total: stop once the study holds this many trials (several processes sharing one
    study; see mpsearch.api.join_study), whoever ran them. gather: at the end, wait for the trials
    other processes are running and make result.trials every trial of the study (the tracker logs
    the others' trials then). heartbeats: the storage keeps a heartbeat of each running trial
    (shared RDB storages; see Heartbeats).

    early_stop: multi-fidelity scoring. A candidate is scored on part of the evaluation batches
    first and stopped ("pruned", its metric the estimate on those batches) when its metric
    cannot, with high confidence, reach the best metric of a complete trial no costlier in any
    cost objective: it would be dominated (see Evaluator.score). The study is told the estimate.

    On Ctrl-C the trials in flight are told to the study as failed (those already scored are
    told their scores), every finished trial stays in result.json and in the study's storage,
    and KeyboardInterrupt propagates.
    """
    loop = TrialLoop(result=result, space=space, cost_model=cost_model, study=study, out_dir=out_dir,
                     tracker=tracker, executor=executor or LocalExecutor(evaluator), budgets=budgets,
                     objectives=objectives, seeds=seeds, seeds_only=seeds_only, on_trial=on_trial,
                     early_stop=early_stop, study_total=study_total, heartbeats=heartbeats, refiner=refiner)
    return loop.run(n_trials, gather=gather, progress=progress)


class TrialLoop:
    """The trials of one search, each through named steps:

        ask       the study proposes a candidate (a seed first, while there are any)
        price     the cost model prices it; over a budget or unrunnable: priced only
        dispatch  scored again never: a repeat reuses a score or waits for the one in flight;
                  anything else goes to the executor
        on_outcome  a scoring came back: its trial (and repeats waiting for it) are ready
        tell      the study learns of the oldest ready trial, in the order asked
        publish   result.json, MLflow, the callback and the progress bar learn of it

    `drive` runs them: up to `executor.slots` trials in flight, trial k asked right after trial
    k - slots is told. `stop` is the fallback on Ctrl-C, a lost cluster or a failed write. See
    run_search for what each option means."""

    def __init__(self, *, result: SearchResult, space: SearchSpace, cost_model: CostModel, study: optuna.Study,
                 out_dir: Path, tracker: Tracker | None, executor: Executor, budgets: Budgets = NO_BUDGETS,
                 objectives: Sequence[str] = DEFAULT_OBJECTIVES, seeds: Iterable[Candidate] = (),
                 seeds_only: bool = False, on_trial: Callable[[TrialRecord], None] | None = None,
                 early_stop: bool = False, study_total: int | None = None,
                 heartbeats: Heartbeats | None = None, refiner: Refiner | None = None) -> None:
        self.result, self.space, self.cost_model, self.study = result, space, cost_model, study
        self.tracker, self.executor, self.budgets, self.on_trial = tracker, executor, budgets, on_trial
        self.seeds, self.seeds_only, self.early_stop = iter(seeds), seeds_only, early_stop
        self.study_total, self.heartbeats, self.refiner = study_total, heartbeats, refiner
        self.result_path = out_dir / "result.json"
        self.dists = space.distributions()
        self.costs = [o for o in objectives if o != "metric"]
        # What the study is told in place of a metric for an infeasible trial: worse than anything
        # a scored trial reports. Samplers that know constraints rank by those instead.
        self.floor = -abs(result.reference["fp32_metric"]) * 10 - 1.0
        self.fp32_ms = result.reference.get("fp32_latency_ms")
        self.first_trial_of: dict[Candidate, int] = {}
        self.scored: dict[Candidate, TrialRecord] = {}  # complete trials (of a resumed search too): not scored again
        for t in result.trials:
            if t.state in ("complete", "pruned"):
                self.first_trial_of.setdefault(t.config, t.number)
            if t.state == "complete":
                self.scored.setdefault(t.config, t)
        self.pending: dict[int, _Pending] = {}  # by trial number, in the order asked
        self.memo: dict[int, tuple[TrialRecord, str]] = {}  # result.json lines of told records
        self.in_flight: dict[Candidate, int] = {}  # configuration -> the trial scoring it
        self.interrupts = _DeferredInterrupt()
        self.owner = this_process()
        self.asked = 0
        self.n_trials = 0
        self.bar = None

    # -- the run ----------------------------------------------------------------------------------
    def run(self, n_trials: int, gather: bool = False, progress: bool = True) -> SearchResult:
        """Up to n_trials more trials (see run_search); the result, written."""
        result, tracker = self.result, self.tracker
        self.n_trials = n_trials
        self.bar = tqdm(total=n_trials, desc="search", unit="trial", file=sys.stderr, disable=not progress)
        orphans = fail_stale_trials(self.study, self.heartbeats)
        if orphans:
            print(f"mpsearch: failed {_trials(len(orphans))} left running by a process that is gone "
                  f"(trial{'s' if len(orphans) > 1 else ''} {', '.join(map(str, orphans))})", file=sys.stderr)
        loop_t0 = time.perf_counter()
        try:
            self.interrupts.install()
            self.drive()
            # a shared study: while other processes finish their trials, one of them may die and its
            # trial be enqueued again (heartbeats): run it here
            while (gather and self.study_total is not None and self.asked < n_trials
                   and _slot_freed(self.study, self.study_total, self.heartbeats)):
                self.drive()
        except (KeyboardInterrupt, MpsearchError, OSError) as stop:
            self.stop(stop)
        finally:
            self.interrupts.restore()
            self.bar.close()
            for p in self.pending.values():
                _stop_heartbeat(p)
        result.settings["search_s"] = time.perf_counter() - loop_t0  # this run's trials, wall time
        if gather:
            _gather(result, self.study, self.space, tracker, self.heartbeats)
        result.interrupted = False
        result.write(self.result_path)
        if tracker is not None:
            tracker.finish(result)
        return result

    def drive(self) -> None:
        """Keep `executor.slots` trials in flight; tell each, in the order asked, once ready."""
        while len(self.pending) < self.executor.slots and self.step():
            pass
        while self.pending:
            head = next(iter(self.pending.values()))
            if not head.ready:
                for outcome in self.executor.wait():
                    self.on_outcome(outcome)
                continue
            told = self.tell(head)
            self.step()  # trial k is asked right after trial k - slots is told, and sent to a worker at once
            # result.json while the workers score; when the next trial is ready too, after it (the
            # writes of trials told back to back are one, so a waiting worker is not kept waiting)
            self.publish(told, write=not (self.pending and next(iter(self.pending.values())).ready))

    def step(self) -> bool:
        """Ask, price and dispatch one more trial; False when there are no more to run."""
        p = self.ask()
        if p is None:
            return False
        self.price(p)
        if not p.ready:
            self.dispatch(p)
        return True

    # -- the steps --------------------------------------------------------------------------------
    def ask(self) -> _Pending | None:
        """The next trial from the study (a seed enqueued first, while there are any), held by
        this process: its heartbeat started and its owner named; None when no more are to run
        (n_trials asked, the seeds of a seeds-only plan used, or the shared study's total reached)."""
        study = self.study
        if self.asked >= self.n_trials:
            return None
        if self.study_total is not None:
            fail_stale_trials(study, self.heartbeats)
            if counted_trials(study) >= self.study_total:
                return None
        t0 = time.perf_counter()
        seed = next(self.seeds, None)
        if seed is None and self.seeds_only:
            return None
        if seed is None and self.refiner is not None:
            stalled = self.refiner.stalled(self.result.trials)
            if stalled is not None:
                self.stopped_early(stalled)
                return None
            seed = self.refiner.propose(self.result.trials)
        with self.interrupts.critical():  # a trial created in the storage is always one we hold
            if seed is not None:
                study.enqueue_trial(self.space.params(seed), skip_if_exists=False)
            with warnings.catch_warnings():  # heartbeats kept by hand (Heartbeats), not by Study.optimize
                warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed", category=UserWarning)
                trial = study.ask(self.dists)
            # a trial this process dies holding is recognised by its heartbeat (its first one is
            # recorded now), by its owner, or by having neither (fail_stale_trials)
            beat = self.heartbeats.start(trial) if self.heartbeats else None
            trial.set_user_attr(OWNER_ATTR, self.owner)
            if self.study_total is not None and _over_total(study, trial.number, self.study_total):
                # another process asked the study's last trials meanwhile: the total holds
                study.tell(trial, state=TrialState.FAIL)
                if beat is not None:
                    beat.join()
                return None
            p = self.pending[trial.number] = _Pending(trial, t0, heartbeat=beat)
        self.asked += 1
        return p

    def stopped_early(self, best: TrialRecord) -> None:
        """The refiner's patience ran out: no more trials, and say so (once)."""
        if "stopped_early" in self.result.settings:
            return
        patience = self.refiner.patience
        self.result.settings["stopped_early"] = {"after_trials": len(self.result.trials), "patience": patience,
                                                 "best_trial": best.number}
        print(f"mpsearch: stopped early after {_trials(len(self.result.trials))}: no better configuration within "
              f"the budgets in the last {_trials(patience)} (best: trial {best.number}; --patience 0 runs every trial)",
              file=sys.stderr)

    def price(self, p: _Pending) -> None:
        """The candidate's costs into its record; over a budget or unrunnable, it is ready
        (priced only: "infeasible")."""
        candidate = self.space.candidate(p.trial.params)
        p.t1 = time.perf_counter()
        cost = self.cost_model.price(candidate)
        record = TrialRecord(
            number=p.trial.number,
            state="complete",
            config=candidate,
            metric=None,
            latency_ms=cost.latency_ms,
            weight_bytes=cost.weight_bytes,
            bops=cost.bops,
            feasible=cost.feasible,
            peak_act_bytes=cost.peak_act_bytes,
            energy_mj=None if cost.energy_j is None else cost.energy_j * 1e3,
            worker=THIS_PROCESS,
        )
        p.record, p.feasible, p.overruns = record, cost.feasible, self.budgets.overruns(cost)
        if not cost.feasible:
            record.state, record.reason = "infeasible", cost.reason
        elif any(v > 0 for v in p.overruns.values()):
            record.state, record.feasible = "infeasible", False
            record.reason = self.budgets.reason(cost)
        record.pricing_s = time.perf_counter() - p.t1
        p.ready = record.state != "complete"

    def dispatch(self, p: _Pending) -> None:
        """A candidate worth scoring: a configuration scored before reuses its score, a repeat of
        one in flight waits for it, anything else goes to the executor."""
        record = p.record
        candidate = record.config
        record.duplicate_of = self.first_trial_of.setdefault(candidate, record.number)
        if record.duplicate_of == record.number:
            record.duplicate_of = None
        earlier = self.scored.get(candidate)
        if earlier is not None:
            _apply(record, Score(earlier.metric, dict(earlier.proxies), intervals=dict(earlier.intervals)), None, 0.0,
                   None)
            p.ready = True
        elif candidate in self.in_flight:
            p.waits_for = self.in_flight[candidate]
        else:
            p.threshold = _dominating_metric(self.result.trials, record, self.costs) if self.early_stop else None
            self.in_flight[candidate] = record.number
            self.executor.submit(record.number, candidate, p.threshold)

    def on_outcome(self, outcome: Outcome) -> None:
        """A scoring came back: its trial, and any repeat waiting for it, are ready."""
        p = self.pending[outcome.key]
        self.in_flight.pop(p.record.config, None)
        for q in (p, *(q for q in self.pending.values() if q.waits_for == outcome.key)):
            _apply(q.record, outcome.score, outcome.error, outcome.seconds if q is p else 0.0, p.threshold)
            q.record.worker = outcome.worker or q.record.worker
            q.ready = True

    def tell(self, p: _Pending) -> TrialRecord:
        """Tell the study of a ready trial (in the order asked) and add it to the result."""
        record, trial, study = p.record, p.trial, self.study
        t3 = time.perf_counter()
        with self.interrupts.critical():  # the study and the result learn of the trial together
            with warnings.catch_warnings():  # a retried trial has its original's constraints: the same values
                warnings.filterwarnings("ignore", message="The constraint value is ignored", category=UserWarning)
                trial.set_constraint(UNSUPPORTED, 0.0 if p.feasible else 1.0)
                for key, over in p.overruns.items():
                    trial.set_constraint(key, over if p.feasible else 0.0)
            record.sampler_s = p.t1 - p.t0
            record.seconds = time.perf_counter() - p.t0
            # what a dashboard shows, a resume reads back; the state last: a trial that holds it holds
            # the whole record (kill -9 can land between any two writes). A retry inherits its
            # original's attributes: all fields are written then, defaults too.
            inherited = any(k in _RECORD_FIELDS or k.startswith(PROXY_PREFIX) for k in trial.user_attrs)
            attrs = record_attrs(record, self.fp32_ms, every_field=inherited)
            state = attrs.pop(STATE_ATTR)
            for key, v in attrs.items():
                trial.set_user_attr(key, v)
            trial.set_user_attr(STATE_ATTR, state)
            if record.state == "fail":
                study.tell(trial, state=TrialState.FAIL)
            else:
                metric = record.metric if record.state in ("complete", "pruned") else self.floor
                study.tell(trial, [metric, *(_told(record, c) for c in self.costs)])
            del self.pending[record.number]
            _stop_heartbeat(p)
            # the sampler's share: asking, and telling (constraints, record, tell: storage and
            # the sampler's own bookkeeping); the stored record has the asking part only
            record.sampler_s = (p.t1 - p.t0) + (time.perf_counter() - t3)
            record.seconds = time.perf_counter() - p.t0
            self.result.trials.append(record)
        if record.state == "complete":
            self.scored.setdefault(record.config, record)
        return record

    def publish(self, record: TrialRecord, write: bool = True) -> None:
        """result.json, MLflow, the callback and the progress bar learn of a told trial."""
        result = self.result
        if write:
            result.write(self.result_path, self.memo)  # told records do not change: each is encoded once
        if self.tracker is not None:
            self.tracker.log_trial(record)
        if self.on_trial is not None:
            self.on_trial(record)
        best = result.best
        if best is not None:
            b = result.trial(best)
            self.bar.set_postfix(best=f"{b.metric:.4f}", latency_ms=f"{b.latency_ms:.4g}", refresh=False)
        self.bar.update(1)

    # -- the fallback -----------------------------------------------------------------------------
    def stop(self, stop: BaseException) -> NoReturn:
        """Ctrl-C, the workers are gone, or a file cannot be written (a full disk): keep what is
        finished, fail what is in flight (a resume runs it again), then raise: SearchInterrupted
        on Ctrl-C, the error otherwise (saying what was kept)."""
        result = self.result
        for p in list(self.pending.values()):
            try:
                if p.ready:
                    self.publish(self.tell(p))
                else:
                    self.study.tell(p.trial, state=TrialState.FAIL)
                    _stop_heartbeat(p)
            except Exception:  # noqa: BLE001, S110 - storage may be mid-write; finished trials are safe
                pass
        self.executor.close()
        result.interrupted = True
        try:
            result.write(self.result_path)
        except OSError:
            if not isinstance(stop, OSError):
                raise
        if self.tracker is not None:
            self.tracker.finish(result, status="KILLED" if isinstance(stop, KeyboardInterrupt) else "FAILED")
        if isinstance(stop, OSError):
            raise stop  # the caller says what was kept (the study holds every told trial)
        done = len(result.trials)
        kept = f"{done} finished trial{'s' if done != 1 else ''} kept in {self.result_path} and in the study storage"
        if isinstance(stop, MpsearchError):
            raise type(stop)(f"{stop}; {kept}" if done else str(stop)) from None
        raise SearchInterrupted(kept, str(self.result_path)) from None


def _slot_freed(study: optuna.Study, total: float, heartbeats: Heartbeats | None) -> bool:
    """Wait (up to GATHER_TIMEOUT_S) while other processes run trials of a shared study; True as
    soon as the study counts fewer than `total` trials again (a dead process's trial was failed
    and enqueued again: heartbeats), False when nothing runs any more (or on the timeout, saying
    so)."""
    deadline = time.monotonic() + GATHER_TIMEOUT_S
    said = False
    while True:
        fail_stale_trials(study, heartbeats)
        if counted_trials(study) < total:
            return True
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return False
        if time.monotonic() > deadline:
            print(f"mpsearch: {_trials(len(running))} still running elsewhere after "
                  f"{GATHER_TIMEOUT_S:.0f} s, left out of result.json (their process may have died)", file=sys.stderr)
            return False
        if not said:
            print(f"mpsearch: waiting (up to {GATHER_TIMEOUT_S:.0f} s) for {_trials(len(running))} other processes "
                  f"are running (a trial whose process died is failed within {ORPHAN_GRACE_S:.0f} s)", file=sys.stderr)
            said = True
        time.sleep(0.5)


def _gather(result: SearchResult, study: optuna.Study, space: SearchSpace, tracker: Tracker | None,
            heartbeats: Heartbeats | None) -> None:
    """Wait for the trials other processes are running on a shared study (see _slot_freed), then
    take every trial of the study into the result, logging the others' to the tracker."""
    _slot_freed(study, -math.inf, heartbeats)
    mine = {t.number for t in result.trials}
    records = [record_of(t, space) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
               if has_record(t)]
    for r in records:
        if r.number not in mine and tracker is not None:
            tracker.log_trial(r)
    result.trials = records


def record_attrs(record: TrialRecord, fp32_latency_ms: float | None, every_field: bool = False) -> dict[str, object]:
    """A trial's record as the study's user attributes: one per field (those at their default
    left out unless every_field), its proxies as `proxy.<name>`, its confidence intervals as
    `ci95_low.<name>` and `ci95_high.<name>`, and the speed-up over FP32 and
    the mean bit widths to read in a dashboard. The configuration is not among them: it is the
    trial's params."""
    d = record.to_dict()
    del d["config"], d["number"]
    out: dict[str, object] = {k: v for k, v in d.items()
                              if k not in ("proxies", "intervals") and (every_field or v != _RECORD_DEFAULTS.get(k, ()))}
    out.update({f"{PROXY_PREFIX}{k}": v for k, v in record.proxies.items()})
    for k, (lo, hi) in record.intervals.items():
        out.update({f"{CI_LOW}{k}": lo, f"{CI_HIGH}{k}": hi})
    out["speedup_fp32"] = speedup(fp32_latency_ms, record.latency_ms)
    out["mean_weight_bits"] = round(record.mean_weight_bits, 4)
    out["mean_activation_bits"] = round(record.mean_activation_bits, 4)
    return out


_RECORD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrialRecord)
                    if f.default is not dataclasses.MISSING}


def has_record(trial: FrozenTrial) -> bool:
    """Whether a trial of the study holds a finished trial's whole record (record_attrs): it was
    told (complete; or failed, as its record says) and its state attribute, written last, is
    there. A trial whose process was killed part-way through telling it (failed as an orphan,
    its record partial or saying "complete"), and a retry that inherited its original's
    attributes and is not told yet, hold none."""
    attrs = trial.user_attrs
    if RECORD_ATTR in attrs:  # a study written before the per-field record
        return trial.state.is_finished()
    state = attrs.get(STATE_ATTR)
    if state is None:
        return False
    if trial.state == TrialState.COMPLETE:
        return state != "fail"
    return trial.state == TrialState.FAIL and state == "fail"


def record_of(trial: FrozenTrial, space: SearchSpace) -> TrialRecord:
    """The TrialRecord a trial of the study holds (record_attrs; or, in a study written before,
    the one JSON attribute RECORD_ATTR), its configuration read from its params in `space`."""
    attrs = trial.user_attrs
    if STATE_ATTR not in attrs:
        return TrialRecord.from_dict(attrs[RECORD_ATTR])
    fields = {k: v for k, v in attrs.items()
              if k in _RECORD_FIELDS and k not in ("config", "proxies", "intervals", "number")}
    proxies = {k.removeprefix(PROXY_PREFIX): v for k, v in attrs.items() if k.startswith(PROXY_PREFIX)}
    intervals = {k.removeprefix(CI_LOW): [v, attrs[CI_HIGH + k.removeprefix(CI_LOW)]] for k, v in attrs.items()
                 if k.startswith(CI_LOW) and CI_HIGH + k.removeprefix(CI_LOW) in attrs}
    return TrialRecord(number=trial.number, config=space.candidate(trial.params), proxies=proxies,
                       intervals=intervals, **{"metric": None, **fields})


_RECORD_FIELDS = {f.name for f in dataclasses.fields(TrialRecord)}


def _apply(record: TrialRecord, score: Score | None, error: str | None, seconds: float,
           threshold: float | None) -> None:
    """A scoring's outcome into the trial's record."""
    record.scoring_s = seconds
    if score is None:
        record.state, record.reason = "fail", error or "no score"
        return
    record.metric, record.proxies = score.metric, dict(score.proxies)
    record.intervals = {k: list(v) for k, v in score.intervals.items()}
    if score.fidelity < 1:
        record.state, record.fidelity = "pruned", score.fidelity
        record.reason = (
            f"stopped after {score.fidelity:.0%} of the evaluation batches: "
            f"{score.metric:.4g} there, at most {score.metric_upper:.4g} expected in "
            f"full, below {threshold:.4g} of a trial no costlier"
        )


def counted_trials(study: optuna.Study) -> int:
    """The trials that count towards a shared study's total: every one asked, except those failed
    because their process died (no record: a retry of it, if any, is counted instead)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if _counts(t))


def _counts(t: FrozenTrial) -> bool:
    return t.state != TrialState.WAITING and (t.state != TrialState.FAIL or has_record(t))


def fail_stale_trials(study: optuna.Study, heartbeats: Heartbeats | None = None) -> list[int]:
    """Fail the running trials of processes that are gone; the numbers of those failed here (not
    by the heartbeats).

    - RDB storages with a heartbeat interval: a trial whose heartbeat stopped (Optuna's public
      fail_stale_trials; the retry callback enqueues it again).
    - Every storage: a trial whose owner (OWNER_ATTR) is a process of this host that has ended,
      and a trial that names no owner ORPHAN_GRACE_S after it started (its process died between
      asking and naming itself). A dead owner on another host is known by its heartbeat only.
      With `heartbeats`, these go to the storage's stale-trial callback too (enqueued again).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    failed = []
    now = _dt.datetime.now()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get(OWNER_ATTR)
        if owner is None and t.datetime_start is not None:
            gone = (now - t.datetime_start).total_seconds() > ORPHAN_GRACE_S
        else:
            gone = isinstance(owner, str) and process_gone(owner)
        if gone:
            try:
                study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
            except (ValueError, optuna.exceptions.UpdateFinishedTrialError):  # failed by another process meanwhile
                continue
            failed.append(t.number)
    retry = heartbeats.storage.get_heartbeat_stale_trial_callback() if heartbeats and failed else None
    if retry is not None:
        for t in study.get_trials(states=(TrialState.FAIL,)):
            if t.number in failed:
                retry(study, t)
    return failed


def _over_total(study: optuna.Study, number: int, total: float) -> bool:
    """Whether trial `number` comes after the first `total` trials the study counts (counted_trials):
    processes sharing a study may each see room for one more and ask at once; the later ones yield."""
    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.number <= number and _counts(t)) > total


def _trials(n: int) -> str:
    return f"{n} trial{'s' if n != 1 else ''}"


class Heartbeats:
    """A heartbeat for each running trial of a study in an RDB storage with a heartbeat interval,
    through the storage's public record_heartbeat: a thread per trial records one every interval
    until the trial is told (Study.optimize does the same; an ask/tell loop must do it itself)."""

    def __init__(self, storage: optuna.storages.RDBStorage, study_name: str) -> None:
        self.storage = storage
        self.interval = storage.get_heartbeat_interval()
        self.study_id = storage.get_study_id_from_name(study_name)

    @classmethod
    def of(cls, storage, study_name: str) -> Heartbeats | None:
        """The heartbeats of `storage` (None: it keeps none)."""
        if isinstance(storage, optuna.storages.RDBStorage) and storage.get_heartbeat_interval():
            return cls(storage, study_name)
        return None

    def start(self, trial: optuna.Trial) -> _Beat:
        """Record the trial's first heartbeat now, then one every interval in a thread."""
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
        self.storage.record_heartbeat(trial_id)
        beat = _Beat(self.storage, trial_id, self.interval)
        beat.start()
        return beat


class _Beat(threading.Thread):
    def __init__(self, storage, trial_id: int, interval: float) -> None:
        super().__init__(daemon=True, name=f"mpsearch-heartbeat-{trial_id}")
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def join(self, timeout: float | None = None) -> None:
        self.stop.set()
        super().join(timeout)


def _stop_heartbeat(p: _Pending) -> None:
    if p.heartbeat is not None:
        p.heartbeat.join()
        p.heartbeat = None


def _told(record: TrialRecord, objective: str) -> float:
    """A cost objective's value as told to the study (finite: an unpriceable cost is huge)."""
    v = objective_value(record, objective)
    return v if v is not None and math.isfinite(v) else 1e30
