"""Multi-fidelity scoring: the bound, the evaluator's early stop, and a search that uses it."""

import math

import pytest

import mpsearch
from hw_models import Candidate, Precision
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import EARLY_STOP_Z, Evaluator, _upper_bound
from mpsearch.tasks import Task, load_task

P = Precision


def test_upper_bound_by_hand():
    # k = 2 batches seen of n = 8: metric 0.5, per-batch 0.4 and 0.6 (sd 0.1414)
    sd = math.sqrt(0.02)
    expected = 0.5 + 6 / 8 * EARLY_STOP_Z * sd * math.sqrt(1 / 2 + 1 / 6)
    assert _upper_bound(0.5, [0.4, 0.6], 8) == pytest.approx(expected)
    assert _upper_bound(0.25, [0.25, 0.25, 0.25], 12) == 0.25  # no spread, no allowance


@pytest.fixture(scope="module")
def digits12():
    """digits with its 360 test images in 12 evaluation batches of 30."""
    base = load_task("digits")
    xs = [x for inputs, _ in base.eval_batches for x in inputs.split(30)]
    ys = [y for _, target in base.eval_batches for y in target.split(30)]
    task = Task("digits12", base.model, base.calib_batches, list(zip(xs, ys)), "accuracy", base.metric_fn,
                fp32_metric=base.fp32_metric)
    return task, analyze(task.model, task.example_input)


def test_evaluator_stops_a_hopeless_candidate_after_a_quarter(digits12):
    task, analysis = digits12
    ev = Evaluator(task, analysis)
    hopeless = Candidate.uniform(analysis.fqns, P.INT2, P.INT2)
    good = Candidate.uniform(analysis.fqns, P.INT8, P.INT8)
    s = ev.score(hopeless, stop_below=0.9)
    assert s.fidelity == 3 / 12  # ceil(0.25 * 12) batches
    assert s.metric < 0.5 and s.metric_upper < 0.9
    assert ev.n_batches_scored == 3
    # the estimate is the metric on those 3 batches
    outs = ev.outputs(hopeless)[:3]
    assert s.metric == pytest.approx(task.metric_fn(outs, [t for _, t in task.eval_batches[:3]]))
    # asked again under a threshold it still misses: no new run
    assert ev.score(hopeless, stop_below=0.95) is s and ev.n_evaluations == 1
    # a candidate near the threshold runs in full
    g = ev.score(good, stop_below=0.9)
    assert g.fidelity == 1 and g.metric_upper is None and g.metric > 0.95
    # full scoring on request
    full = ev.score(hopeless)
    assert full.fidelity == 1 and ev.n_batches_scored == 3 + 12 + 12
    assert ev.score(hopeless, stop_below=0.9) is full
    ev.close()


def test_search_with_early_stop_finds_the_same_front(digits12, tmp_path):
    task, _ = digits12
    kw = {"n_trials": 30, "sampler": "random", "seed": 3, "weight_precisions": "int2,int3,int8",
              "activation_precisions": "int8", "track": False, "progress": False, "evaluator_cache": False}
    full = mpsearch.search(task, out_dir=tmp_path / "full", **kw)
    fast = mpsearch.search(task, out_dir=tmp_path / "fast", early_stop=True, **kw)
    assert [t.config for t in full.trials] == [t.config for t in fast.trials]  # random: same proposals
    pruned = [t for t in fast.trials if t.state == "pruned"]
    assert pruned, "int2 layers collapse digits: some candidates must be stopped"
    by_number = {t.number: t for t in full.trials}
    for t in pruned:
        assert 0 < t.fidelity < 1 and "stopped after" in t.reason
        # it really was dominated: a complete trial at least as fast with a better full metric
        assert any(c.state == "complete" and c.latency_ms <= t.latency_ms and c.metric > by_number[t.number].metric
                   for c in fast.trials if c.number < t.number)
    assert [fast.trial(n).config for n in fast.pareto] == [full.trial(n).config for n in full.pareto]
    assert fast.settings["early_stop"] is True
