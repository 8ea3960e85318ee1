"""The trial loop (mpsearch.engine.loop.run_search) driven directly, with a scripted executor in
place of the evaluator: the real digits space and cost model, a real in-memory Optuna study.
What is checked: proposals independent of the order scorings finish in, a repeat in flight
scored once, candidates over budget never scored, scoring errors as failed trials, and Ctrl-C
keeping what finished while failing what was in flight."""

from __future__ import annotations

import json

import optuna
import pytest
from optuna.trial import TrialState

from hw_models import CostModel, Precision, get_profile
from mpsearch.engine.budgets import Budgets
from mpsearch.engine.loop import make_sampler, run_search
from mpsearch.errors import SearchInterrupted
from mpsearch.executors import Outcome
from mpsearch.results.records import SearchResult
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Score
from mpsearch.tasks import load_task
from search_spaces import SearchSpace

P = Precision
OBJECTIVES = ("metric", "latency")


@pytest.fixture(scope="module")
def digits():
    task = load_task("digits")
    analysis = analyze(task.model, task.example_input)
    profile = get_profile("x86-vnni")
    space = SearchSpace(analysis.layers, profile, (P.INT4, P.INT8), (P.INT8,))
    return space, CostModel(analysis.layers, profile)


def metric_of(candidate) -> float:
    """A made-up metric with a known value per configuration: one point per int8 layer."""
    return sum(candidate[f].weight == P.INT8 for f in candidate) / 10


class Scripted:
    """An executor with `slots` scorings in flight that finishes them in a chosen order ("fifo"
    or "lifo"), scoring each with metric_of (or an error for the configurations in `errors`);
    it raises KeyboardInterrupt at the wait after `interrupt_after` outcomes."""

    def __init__(self, slots: int, order: str = "fifo", errors=(), interrupt_after: int | None = None,
                 metric=metric_of):
        self.slots, self.workers, self.order, self.metric = slots, slots, order, metric
        self.errors, self.interrupt_after = set(errors), interrupt_after
        self.queue: list = []
        self.submitted: list = []
        self.returned = 0

    def submit(self, key, candidate, stop_below):
        self.queue.append((key, candidate))
        self.submitted.append(candidate)

    def wait(self):
        if self.interrupt_after is not None and self.returned >= self.interrupt_after:
            self.in_flight = len(self.queue)
            raise KeyboardInterrupt
        key, candidate = self.queue.pop(0 if self.order == "fifo" else -1)
        self.returned += 1
        if candidate in self.errors:
            return [Outcome(key, None, "the model failed under this configuration")]
        return [Outcome(key, Score(self.metric(candidate)), None, 0.001, "test:1")]

    def close(self):
        self.queue.clear()


def search(digits, tmp_path, executor, n_trials=12, seeds=(), seeds_only=False, budgets=None, seed=3):
    space, cost_model = digits
    result = SearchResult(task="digits", target="x86-vnni", trials=[],
                          reference={"fp32_metric": 1.0, "fp32_latency_ms": 1.0},
                          settings={"objectives": list(OBJECTIVES)})
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler("tpe", seed, n_trials))
    result = run_search(result=result, space=space, cost_model=cost_model, evaluator=None, study=study,
                        n_trials=n_trials, out_dir=tmp_path, tracker=None, budgets=budgets or Budgets(), objectives=OBJECTIVES,
                        seeds=seeds, seeds_only=seeds_only, progress=False, executor=executor)
    return result, study


def test_proposals_do_not_depend_on_the_order_scorings_finish_in(digits, tmp_path):
    runs = {}
    for order in ("fifo", "lifo"):
        result, study = search(digits, tmp_path, Scripted(3, order), n_trials=14)
        runs[order] = [t.config for t in result.trials]
        assert [t.number for t in result.trials] == list(range(14))  # told in the order asked
        assert [t.metric for t in result.trials] == [metric_of(c) for c in runs[order]]
        assert [t.values[0] for t in study.trials] == [t.metric for t in result.trials]
    assert runs["fifo"] == runs["lifo"]
    # and the sampler does listen to the scores (past its 10 random start-up trials)
    inverted, _ = search(digits, tmp_path, Scripted(3, metric=lambda c: 1 - metric_of(c)), n_trials=14)
    assert [t.config for t in inverted.trials][:10] == runs["fifo"][:10]
    assert [t.config for t in inverted.trials][10:] != runs["fifo"][10:]


def test_a_repeat_in_flight_is_scored_once_and_both_trials_get_its_score(digits, tmp_path):
    space, _ = digits
    a, b = space.uniform(P.INT8, P.INT8), space.uniform(P.INT4, P.INT8)
    ex = Scripted(3)
    result, _ = search(digits, tmp_path, ex, seeds=[a, a, b, a], seeds_only=True)
    assert ex.submitted == [a, b]
    assert [(t.config, t.metric, t.duplicate_of) for t in result.trials] == [
        (a, metric_of(a), None), (a, metric_of(a), 0), (b, metric_of(b), None), (a, metric_of(a), 0)]
    assert [t.scoring_s > 0 for t in result.trials] == [True, False, True, False]  # only scorings take time


def test_a_candidate_over_budget_is_priced_but_never_scored(digits, tmp_path):
    space, cost_model = digits
    fast, slow = space.uniform(P.INT4, P.INT8), space.uniform(P.INT8, P.INT8)
    limit = (cost_model.price(fast).latency_ms + cost_model.price(slow).latency_ms) / 2
    ex = Scripted(1)
    result, study = search(digits, tmp_path, ex, seeds=[slow, fast], seeds_only=True,
                           budgets=Budgets(latency_ms=limit))
    assert ex.submitted == [fast]
    over, within = result.trials
    assert (over.state, over.metric, within.state) == ("infeasible", None, "complete")
    assert "latency" in over.reason
    overrun = cost_model.price(slow).latency_ms - limit
    assert study.trials[0].constraints == pytest.approx({"unsupported_precision": 0.0,
                                                        "latency_over_budget_ms": overrun})
    assert study.trials[1].constraints["latency_over_budget_ms"] < 0
    assert study.trials[0].values[0] < -1.0  # told below any real metric


def test_a_scoring_error_is_a_failed_trial_and_the_search_goes_on(digits, tmp_path):
    space, _ = digits
    bad, good = space.uniform(P.INT4, P.INT8), space.uniform(P.INT8, P.INT8)
    result, study = search(digits, tmp_path, Scripted(2, errors=[bad]), seeds=[bad, good], seeds_only=True)
    assert [(t.state, t.reason) for t in result.trials] == [
        ("fail", "the model failed under this configuration"), ("complete", "")]
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]


def test_ctrl_c_keeps_the_finished_trials_and_fails_those_in_flight(digits, tmp_path):
    ex = Scripted(3, interrupt_after=4)
    space, cost_model = digits
    result = SearchResult(task="digits", target="x86-vnni", trials=[],
                          reference={"fp32_metric": 1.0, "fp32_latency_ms": 1.0},
                          settings={"objectives": list(OBJECTIVES)})
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=make_sampler("tpe", 0, 10))
    with pytest.raises(SearchInterrupted) as stop:
        run_search(result=result, space=space, cost_model=cost_model, evaluator=None, study=study, n_trials=10,
                   out_dir=tmp_path, tracker=None, objectives=OBJECTIVES, progress=False, executor=ex)
    kept = len(result.trials)  # the 4 scored, and any repeat of them that was ready (its score known)
    assert kept >= 4 and f"{kept} finished trials kept" in str(stop.value)
    assert ex.in_flight == 3
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * kept + [TrialState.FAIL] * ex.in_flight
    written = json.loads((tmp_path / "result.json").read_text())
    assert written["interrupted"] is True and [t["number"] for t in written["trials"]] == list(range(kept))
