"""Budget-aware refinement (mpsearch.engine.refine): the neighbours of the best trial in the order
the sensitivity table predicts, within the budgets, and the early stop; hand-computed on a
three-layer space, then a real budgeted digits search."""

from __future__ import annotations

import pytest

import mpsearch
from hw_models import Candidate, CostModel, LayerChoice, LayerSpec, Precision, get_profile
from mpsearch.engine.budgets import Budgets
from mpsearch.engine.refine import Refiner, default_patience
from mpsearch.results.records import TrialRecord
from mpsearch.results.selection import DropBudget
from search_spaces import SearchSpace

P = Precision
I4, I8 = LayerChoice(P.INT4, P.INT8), LayerChoice(P.INT8, P.INT8)
# weight bytes (x86-vnni stores int4 as INT4): l1 1000 weights, 10 channels: int8 1040, int4 540;
# l2 2000 weights, 20 channels: int8 2080, int4 1080; l3 500 weights, 10 channels: int8 540, int4 290
LAYERS = [LayerSpec("l1", "linear", (10, 100), 1, 1000, 100, 10), LayerSpec("l2", "linear", (20, 100), 1, 2000, 100, 20),
          LayerSpec("l3", "linear", (10, 50), 1, 500, 50, 10)]
SENS = {"l1": {I8: 0.1, I4: 1.0}, "l2": {I8: 0.2, I4: 0.5}, "l3": {I8: 0.05, I4: 2.0}}
DROP = DropBudget(0.01, 0.98, "given", mode="most_accurate")


def refiner(size_bytes: float, patience: int | None = None) -> Refiner:
    x86 = get_profile("x86-vnni")
    space = SearchSpace(LAYERS, x86, [P.INT4, P.INT8], [P.INT8])
    return Refiner(space, CostModel(LAYERS, x86), Budgets(size_bytes=size_bytes), SENS, DROP,
                   ["metric", "weight_memory"], patience)


def trial(n, cfg, metric=0.99, kl=0.01):
    return TrialRecord(n, "complete", Candidate(cfg), metric, 1.0, 0, 0, True, proxies={"kl_to_fp32": kl})


def test_neighbours_come_in_the_order_the_table_predicts_and_within_the_budget():
    r = refiner(3000)
    start = {"l1": I4, "l2": I8, "l3": I4}  # 540 + 2080 + 290 = 2910 bytes; sensitivity 3.2
    order = [(round(d, 6), dict(c.items())) for d, c in r.neighbours(Candidate(start))]
    assert order == [
        (-1.95, {"l1": I4, "l2": I8, "l3": I8}),  # l3 up: 3160 bytes
        (-1.65, {"l1": I4, "l2": I4, "l3": I8}),  # l3 up, l2 down: 2160
        (-0.9, {"l1": I8, "l2": I8, "l3": I4}),  # l1 up: 3410
        (-0.6, {"l1": I8, "l2": I4, "l3": I4}),  # l1 up, l2 down: 2410
        (0.3, {"l1": I4, "l2": I4, "l3": I4}),  # l2 down: 1910
    ]
    trials = [trial(0, start)]
    picks = []
    while (c := r.propose(trials)) is not None:  # over 3000 bytes: skipped; each once
        picks.append(dict(c.items()))
        trials.append(trial(len(trials), c, metric=0.90))  # worse: the best stays trial 0
    assert picks == [order[1][1], order[3][1], order[4][1]]


def test_the_best_trial_is_the_most_accurate_and_patience_counts_trials_since_it():
    r = refiner(3000, patience=3)
    a, b = {"l1": I4, "l2": I8, "l3": I4}, {"l1": I4, "l2": I4, "l3": I8}
    trials = [trial(0, a, 0.99, kl=0.02), trial(1, b, 0.985, kl=0.01)]  # within 0.01: the lower KL wins
    assert r.best(trials).number == 1
    assert r.stalled(trials + [trial(2, a, 0.5), trial(3, a, 0.5)]) is None  # 2 trials since trial 1
    assert r.stalled(trials + [trial(n, a, 0.5) for n in (2, 3, 4)]).number == 1
    assert refiner(3000, patience=0).stalled(trials + [trial(n, a, 0.5) for n in range(2, 40)]) is None
    assert default_patience(50) == 10 and default_patience(200) == 40


def test_a_budgeted_search_refines_near_its_budget_and_stops_when_nothing_improves(tmp_path, capsys):
    r = mpsearch.search("digits", n_trials=40, out_dir=tmp_path / "a", track=False, progress=True,
                        size_budget_mb="70%int8", objectives="metric,weight_memory", patience=5)
    stop = r.settings["stopped_early"]
    assert stop["patience"] == 5 and len(r.trials) < 40 and stop["after_trials"] == len(r.trials)
    assert max(t.number for t in r.trials) - stop["best_trial"] == 5 and r.best == stop["best_trial"]
    err = capsys.readouterr().err
    assert (f"stopped early after {len(r.trials)} trials: no better configuration within the budgets in the last "
            f"5 trials (best: trial {r.best}" in err)
    budget = r.settings["size_budget_mb"] * 1e6
    seeds = r.trials[:r.settings["ilp_solutions"]]
    # the ILP seeds are solved for limits near the budget, not down the whole front to the cheapest
    # configuration (every weight at int4, where a sweep of the whole front starts)
    int4 = CostModel(r.layers, get_profile("x86-vnni")).price(
        Candidate.uniform([x.fqn for x in r.layers], P.INT4, P.INT8)).weight_bytes
    assert all(int4 < t.weight_bytes <= budget for t in seeds), (int4, budget, [t.weight_bytes for t in seeds])
    everything = mpsearch.search("digits", n_trials=12, out_dir=tmp_path / "b", track=False, progress=False,
                                 size_budget_mb="70%int8", objectives="metric,weight_memory", patience=0)
    assert len(everything.trials) == 12 and "stopped_early" not in everything.settings


def test_a_search_without_a_budget_or_with_a_max_drop_has_no_refiner(tmp_path):
    free = mpsearch.search("digits", n_trials=14, out_dir=tmp_path / "a", track=False, progress=False, patience=1)
    assert len(free.trials) == 14 and "patience" not in free.settings
    dropped = mpsearch.search("digits", n_trials=14, out_dir=tmp_path / "b", track=False, progress=False,
                              size_budget_mb="70%int8", max_drop="1%", patience=1)
    assert len(dropped.trials) == 14 and "patience" not in dropped.settings


@pytest.mark.parametrize("bad", [-1, 1.5, "3"])
def test_patience_is_a_natural_number(bad, tmp_path):
    from mpsearch.errors import InvalidConfigError

    with pytest.raises(InvalidConfigError, match="patience"):
        mpsearch.search("digits", n_trials=2, out_dir=tmp_path / "x", track=False, progress=False, patience=bad)
