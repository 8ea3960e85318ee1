"""Budgeted allocation ILP: hand-solved optima, brute force, ties, per-layer limits, sweeps."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from hw_models import LayerChoice, Precision
from mpsearch.engine.ilp import Allocation, min_total, solve_allocation, sweep
from mpsearch.errors import InvalidConfigError

P = Precision
F = LayerChoice(P.FP32, P.FP32)
Q8 = LayerChoice(P.INT8, P.INT8)
Q4 = LayerChoice(P.INT4, P.INT8)
Q2 = LayerChoice(P.INT2, P.INT8)

# layer -> choice -> (sensitivity, bytes, lat)
TABLE = {
    "a": {F: (0.0, 8, 1), Q8: (0.1, 2, 2), Q4: (1.0, 1, 3)},
    "b": {F: (0.0, 4, 1), Q4: (0.5, 1, 1)},
    "c": {F: (0.0, 6, 1), Q8: (0.2, 3, 1), Q2: (3.0, 1, 2)},
}
OPTIONS = {f: list(per) for f, per in TABLE.items()}
SENS = {f: {c: v[0] for c, v in per.items()} for f, per in TABLE.items()}
COSTS = {f: {c: {"bytes": v[1], "lat": v[2]} for c, v in per.items()} for f, per in TABLE.items()}


def brute_force(options, sens, costs, budgets, ties=(), max_terms=None):
    """Least total sensitivity over every combination meeting the constraints (None: none does)."""
    best = None
    fqns = list(options)
    for combo in itertools.product(*(options[f] for f in fqns)):
        pick = dict(zip(fqns, combo, strict=True))
        if any(len({pick[f] for f in tie}) > 1 for tie in ties):
            continue
        if max_terms and any(costs[f][c][k] > m for f, c in pick.items() for k, m in max_terms.items()):
            continue
        if any(sum(costs[f][c][k] for f, c in pick.items()) > b for k, b in budgets.items()):
            continue
        obj = sum(sens[f][c] for f, c in pick.items())
        if best is None or obj < best[0]:
            best = (obj, pick)
    return best


def check(alloc: Allocation, budgets) -> None:
    assert set(alloc.choices) == set(OPTIONS)
    assert alloc.objective == pytest.approx(sum(SENS[f][c] for f, c in alloc.choices.items()))
    for k, b in budgets.items():
        assert alloc.costs[k] == sum(COSTS[f][c][k] for f, c in alloc.choices.items()) <= b


@pytest.mark.parametrize(
    ("budgets", "choices", "objective"),
    [
        ({"bytes": 18}, {"a": F, "b": F, "c": F}, 0.0),
        ({"bytes": 12}, {"a": Q8, "b": F, "c": F}, 0.1),
        ({"bytes": 10}, {"a": Q8, "b": F, "c": Q8}, 0.3),
        ({"bytes": 5}, {"a": Q4, "b": Q4, "c": Q8}, 1.7),
        ({"bytes": 10, "lat": 4}, {"a": Q8, "b": F, "c": Q8}, 0.3),
        ({"bytes": 15, "lat": 3}, {"a": F, "b": F, "c": Q8}, 0.2),
    ],
)
def test_hand_solved_optima(budgets, choices, objective):
    alloc = solve_allocation(OPTIONS, SENS, COSTS, budgets)
    assert alloc.choices == choices
    assert alloc.objective == pytest.approx(objective)
    assert list(alloc.choices) == ["a", "b", "c"]
    assert alloc.candidate()["c"] == choices["c"]
    check(alloc, budgets)


@pytest.mark.parametrize("budgets", [{"bytes": 2}, {"bytes": 10, "lat": 3}, {"lat": 2.5}])
def test_infeasible_budgets_give_none(budgets):
    assert brute_force(OPTIONS, SENS, COSTS, budgets) is None
    assert solve_allocation(OPTIONS, SENS, COSTS, budgets) is None


def test_matches_brute_force_over_a_grid_of_budgets():
    for b_bytes in range(20):
        for b_lat in (3, 4, 5, 6, math.inf):
            budgets = {"bytes": b_bytes, "lat": b_lat}
            best = brute_force(OPTIONS, SENS, COSTS, budgets)
            alloc = solve_allocation(OPTIONS, SENS, COSTS, budgets)
            if best is None:
                assert alloc is None, budgets
            else:
                assert alloc.objective == pytest.approx(best[0], abs=1e-12), budgets
                check(alloc, budgets)


def test_matches_brute_force_on_random_problems():
    rng = np.random.default_rng(0)
    choices = [F, Q8, Q4, Q2]
    for trial in range(20):
        fqns = [f"l{i}" for i in range(4)]
        options = {f: [choices[j] for j in sorted(rng.choice(4, size=rng.integers(2, 5), replace=False))]
                   for f in fqns}
        sens = {f: {c: float(10 ** rng.uniform(-6, 0)) for c in cs} for f, cs in options.items()}
        costs = {f: {c: {"w": float(rng.uniform(1e-5, 1e-3)), "m": float(rng.integers(1, 9))} for c in cs}
                 for f, cs in options.items()}
        budgets = {"w": float(rng.uniform(5e-4, 3e-3)), "m": float(rng.integers(6, 30))}
        best = brute_force(options, sens, costs, budgets)
        alloc = solve_allocation(options, sens, costs, budgets)
        if best is None:
            assert alloc is None, trial
        else:
            assert alloc.objective == pytest.approx(best[0], rel=1e-9), trial
            assert alloc.costs["w"] <= budgets["w"] and alloc.costs["m"] <= budgets["m"]


def test_mobilenet_sized_problem_against_dynamic_programming():
    """53 layers x 11 choices, one integer budget: the exact optimum by a knapsack DP."""
    rng = np.random.default_rng(1)
    pairs = [LayerChoice(w, a) for w in (P.INT2, P.INT3, P.INT4, P.INT6, P.INT8, P.FP32)
             for a in (P.INT8, P.FP32)][:11]
    options = {f"l{i}": pairs for i in range(53)}
    sens = {f: {c: float(10 ** rng.uniform(-6, 0)) for c in pairs} for f in options}
    costs = {f: {c: {"bytes": int(rng.integers(1, 12))} for c in pairs} for f in options}
    budget = 53 * 4
    # dp[b] = least sensitivity of the layers so far with total bytes exactly b
    dp = np.full(budget + 1, np.inf)
    dp[0] = 0.0
    for f in options:
        new = np.full(budget + 1, np.inf)
        for c in pairs:
            k, s = costs[f][c]["bytes"], sens[f][c]
            new[k:] = np.minimum(new[k:], dp[: budget + 1 - k] + s)
        dp = new
    alloc = solve_allocation(options, sens, costs, {"bytes": budget})
    assert alloc.costs["bytes"] <= budget
    assert alloc.objective == pytest.approx(float(dp.min()), rel=1e-7)


def test_ties_force_one_choice():
    # untied, 12 bytes allow a=int8 with b, c in fp32 (0.1); tied a == c they share fp32 or int8
    assert solve_allocation(OPTIONS, SENS, COSTS, {"bytes": 12}).objective == pytest.approx(0.1)
    alloc = solve_allocation(OPTIONS, SENS, COSTS, {"bytes": 12}, ties=[["a", "c"]])
    assert alloc.choices == {"a": Q8, "b": F, "c": Q8}
    assert alloc.objective == pytest.approx(0.3)
    assert alloc.objective == pytest.approx(
        brute_force(OPTIONS, SENS, COSTS, {"bytes": 12}, ties=[["a", "c"]])[0]
    )
    # only common choices survive: a's int4 and c's int2 are gone, so 5 bytes cannot be met
    assert solve_allocation(OPTIONS, SENS, COSTS, {"bytes": 5}, ties=[["a", "c"]]) is None
    # overlapping ties merge into one group
    assert solve_allocation(OPTIONS, SENS, COSTS, {}, ties=[["a", "c"], ["c", "b"]]).choices == {
        "a": F, "b": F, "c": F,
    }
    with pytest.raises(InvalidConfigError):
        solve_allocation(OPTIONS, SENS, COSTS, {}, ties=[["a", "nope"]])


def test_max_terms_exclude_choices():
    assert solve_allocation(OPTIONS, SENS, COSTS, {}).choices == {"a": F, "b": F, "c": F}
    # a per-layer limit of 5 bytes removes fp32 from a (8) and c (6), not from b (4)
    alloc = solve_allocation(OPTIONS, SENS, COSTS, {}, max_terms={"bytes": 5})
    assert alloc.choices == {"a": Q8, "b": F, "c": Q8}
    assert alloc.objective == pytest.approx(0.3)
    assert solve_allocation(OPTIONS, SENS, COSTS, {}, max_terms={"bytes": 0.5}) is None


def test_infinite_costs_are_never_picked_under_a_budget():
    costs = {f: {c: dict(v) for c, v in per.items()} for f, per in COSTS.items()}
    costs["c"][F]["lat"] = math.inf  # a pair the target cannot run
    alloc = solve_allocation(OPTIONS, SENS, costs, {"lat": 10})
    assert alloc.choices == {"a": F, "b": F, "c": Q8} and alloc.costs["lat"] == 3
    assert solve_allocation(OPTIONS, SENS, costs, {"bytes": 100}).choices["c"] == F  # lat not budgeted
    costs["c"][Q8]["lat"] = costs["c"][Q2]["lat"] = math.inf
    assert solve_allocation(OPTIONS, SENS, costs, {"lat": 10}) is None


def test_min_total():
    assert min_total(OPTIONS, COSTS, "bytes") == 3
    assert min_total(OPTIONS, COSTS, "lat") == 3
    assert min_total(OPTIONS, COSTS, "bytes", ties=[["a", "c"]]) == 1 + 5  # a, c share int8 at best


def test_sweep_hand_solved_front():
    front = sweep(OPTIONS, SENS, COSTS, "bytes", 5)
    # budgets 3 .. 18 geometrically: 3, 4.69, 7.35, 11.5, 18
    assert [a.costs["bytes"] for a in front] == [3, 4, 6, 9, 18]
    assert [a.objective for a in front] == pytest.approx([4.5, 3.6, 0.8, 0.3, 0.0])
    assert front[0].choices == {"a": Q4, "b": Q4, "c": Q2}
    assert front[-1].choices == {"a": F, "b": F, "c": F}


def test_sweep_properties_with_an_extra_budget():
    budgets = {"lat": 3}
    front = sweep(OPTIONS, SENS, COSTS, "bytes", 3, budgets=budgets)
    # lat <= 3 leaves a: fp32, c: fp32 / int8; lo = 8 + 1 + 3 = 12, hi = 18; 14.7 repeats 12's answer
    assert [(a.costs["bytes"], a.objective) for a in front] == [(12, pytest.approx(0.7)), (18, 0.0)]
    for n in (1, 2, 4, 7, 12):
        front = sweep(OPTIONS, SENS, COSTS, "bytes", n, budgets={"lat": 4})
        assert 1 <= len(front) <= n
        assert all(a.costs["lat"] <= 4 for a in front)
        costs = [a.costs["bytes"] for a in front]
        objectives = [a.objective for a in front]
        assert costs == sorted(set(costs))  # increasing, no repeats
        assert all(x > y for x, y in itertools.pairwise(objectives))
        assert len({tuple(a.choices.values()) for a in front}) == len(front)
        for a in front:  # each point is optimal for its own cost
            assert a.objective == pytest.approx(
                brute_force(OPTIONS, SENS, COSTS, {"bytes": a.costs["bytes"], "lat": 4})[0]
            )
    assert sweep(OPTIONS, SENS, COSTS, "bytes", 4, budgets={"lat": 2}) == []
    with pytest.raises(InvalidConfigError):
        sweep(OPTIONS, SENS, COSTS, "bytes", 0)


def test_missing_values_are_config_errors():
    with pytest.raises(InvalidConfigError, match="sensitivity"):
        solve_allocation(OPTIONS, {"a": SENS["a"], "b": SENS["b"]}, COSTS, {})
    with pytest.raises(InvalidConfigError, match="latency_s"):
        solve_allocation(OPTIONS, SENS, COSTS, {"latency_s": 1.0})


def test_a_budget_on_the_swept_cost_keeps_the_sweep_near_it():
    # bytes <= 10: the least sensitive allocation is a int8, b fp32, c int8 (9 bytes, 0.3); near 0.2
    # sweeps 7.2 .. 9 bytes: under 7.2 the best is 6 bytes (0.8, as on the hand-solved front), and no
    # point goes down to the 3-byte end the whole front starts from
    front = sweep(OPTIONS, SENS, COSTS, "bytes", 3, budgets={"bytes": 10}, near=0.2)
    assert [(a.costs["bytes"], a.objective) for a in front] == [(6, pytest.approx(0.8)), (9, pytest.approx(0.3))]
    whole = sweep(OPTIONS, SENS, COSTS, "bytes", 3, budgets={"bytes": 10})
    assert whole[0].costs["bytes"] == 3  # without near: from the cheapest
    # near applies to a budget on the swept cost only
    def points(front):
        return [(a.choices, a.costs, a.objective) for a in front]

    assert points(sweep(OPTIONS, SENS, COSTS, "bytes", 3, budgets={"lat": 3}, near=0.2)) == points(
        sweep(OPTIONS, SENS, COSTS, "bytes", 3, budgets={"lat": 3}))
