"""Budgeted precision allocation as an integer linear program.

Given a sensitivity per (layer, choice) (mpsearch.engine.sensitivity) and additive per-layer costs
(latency, weight bytes, BOPs, ...), `solve_allocation` picks one choice per layer minimising the
total sensitivity under budgets on the cost totals:

    minimise    sum_{L,c} s[L,c] x[L,c]
    subject to  sum_c x[L,c] = 1                        for every layer L
                sum_{L,c} cost_k[L,c] x[L,c] <= B_k     for every budget k
                x[L,c] in {0, 1}

Tied layers (which must share a choice) are merged into one group whose sensitivity and costs
are the sums over its members, which is the same as x[L1,c] = x[L2,c]; only the choices every
member offers remain. A per-layer limit (`max_terms`, for maxima such as peak activation memory)
removes the choices above it, and a choice that another of the same layer beats (no more
sensitivity, no more of any budgeted cost) is dropped before solving. Solved by HiGHS through
scipy.optimize.milp: on a MobileNetV2-sized problem (53 layers x 11 choices) one budget takes
~0.03-0.2 s, two tight budgets (weight bytes and latency) up to ~0.5-0.9 s on a 2-core CPU.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from hw_models import Candidate, LayerChoice
from mpsearch.errors import InvalidConfigError, MpsearchError

__all__ = ["Allocation", "choice_costs", "min_total", "solve_allocation", "sweep"]

COST_KEYS = ("latency_s", "weight_bytes", "act_bytes", "bops", "energy_j")
_TOL = 1e-9  # relative slack allowed on a budget (solver round-off)
MIP_REL_GAP = 1e-6  # the optimum is proven to within this share of the total sensitivity
TIME_LIMIT_S = 60.0  # per solve; past it the best allocation found so far is returned


@dataclass(frozen=True)
class Allocation:
    """One choice per layer, its total sensitivity and its cost totals.

    costs: the sum over layers of every cost key all chosen entries have.
    seconds: time spent building and solving the program.
    """

    choices: dict[str, LayerChoice]
    objective: float
    costs: dict[str, float]
    seconds: float

    def candidate(self) -> Candidate:
        return Candidate(self.choices)


def choice_costs(
    cost_model, options: Mapping[str, Sequence[LayerChoice]]
) -> dict[str, dict[LayerChoice, dict[str, float]]]:
    """layer_costs for `solve_allocation` from a hw_models.CostModel: per layer and choice the
    additive COST_KEYS of `CostModel.layer_cost` (energy_j where the target has it). Transitions
    between compute kinds are not additive per layer and are left out."""
    table: dict[str, dict[LayerChoice, dict[str, float]]] = {}
    for fqn, choices in options.items():
        per = table[fqn] = {}
        for c in choices:
            lc = cost_model.layer_cost(fqn, c)
            per[c] = {k: float(v) for k in COST_KEYS if (v := getattr(lc, k)) is not None}
    return table


class _Problem:
    """Groups of tied layers, their common allowed choices, summed sensitivities and costs.

    Per group, the choices some other choice beats (no more sensitivity and no more of any cost
    in `keys`) are dropped: they never help an allocation, whatever the budgets.
    """

    def __init__(
        self,
        options: Mapping[str, Sequence[LayerChoice]],
        layer_costs: Mapping[str, Mapping[LayerChoice, Mapping[str, float]]],
        keys: Sequence[str],
        ties: Sequence[Sequence[str]] = (),
        sensitivity: Mapping[str, Mapping[LayerChoice, float]] | None = None,
        max_terms: Mapping[str, float] | None = None,
    ):
        self.fqns = list(options)
        self.groups = _tie_groups(self.fqns, ties)
        self.keys = list(dict.fromkeys(keys))
        limits = dict(max_terms or {})
        self.choices: list[list[LayerChoice]] = []
        self.sens: list[np.ndarray] = []
        self.costs: dict[str, list[np.ndarray]] = {k: [] for k in self.keys}
        self.feasible = True
        for group in self.groups:
            common = [c for c in dict.fromkeys(options[group[0]]) if all(c in options[f] for f in group[1:])]
            kept, sens, cost = [], [], []
            for c in common:
                s = 0.0 if sensitivity is None else _fsum((_sensitivity(sensitivity, f, c) for f in group), "sensitivity")
                if math.isinf(s):
                    continue
                if any(_cost(layer_costs, f, c, k) > lim for k, lim in limits.items() for f in group):
                    continue
                kept.append(c)
                sens.append(s)
                cost.append([_fsum((_cost(layer_costs, f, c, k) for f in group), k) for k in self.keys])
            keep = _undominated([(s, *c) for s, c in zip(sens, cost, strict=True)])
            self.feasible &= bool(keep)
            self.choices.append([kept[i] for i in keep])
            self.sens.append(np.array([sens[i] for i in keep], dtype=float))
            for j, k in enumerate(self.keys):
                self.costs[k].append(np.array([cost[i][j] for i in keep], dtype=float))
        self.offsets = np.cumsum([0] + [len(c) for c in self.choices])
        self.n = int(self.offsets[-1])

    def flat(self, key: str | None) -> np.ndarray:
        """Sensitivities (key None) or one cost, per variable."""
        parts = self.sens if key is None else self.costs[key]
        return np.concatenate(parts) if parts else np.zeros(0)

    def total(self, picked: list[int], key: str | None) -> float:
        parts = self.sens if key is None else self.costs[key]
        return _fsum((float(parts[g][i]) for g, i in enumerate(picked)), key or "sensitivity")

    def solve(self, objective: np.ndarray, budgets: Mapping[str, float]) -> list[int] | None:
        """Index of the chosen option per group minimising `objective`, or None if infeasible."""
        if not self.feasible:
            return None
        rows = [(self.flat(k), float(b)) for k, b in budgets.items() if not math.isinf(b)]
        if not rows:  # separable: each group's least option
            return [int(np.argmin(objective[a:b])) for a, b in itertools.pairwise(self.offsets)]
        # a choice with an infinite budgeted cost (a pair the target cannot run) is never picked
        ub = np.isfinite(objective).astype(float)
        for a, _ in rows:
            ub[~np.isfinite(a)] = 0.0
        rows = [(np.where(ub > 0, a, 0.0), b) for a, b in rows]
        objective = np.where(ub > 0, objective, 0.0)
        scale = _scale(objective)
        for _ in range(3):
            picked = self._milp(objective / scale, rows, ub)
            if picked is None:
                return None
            x = np.zeros(self.n)
            x[[self.offsets[g] + i for g, i in enumerate(picked)]] = 1.0
            over = [(j, float(a @ x) - b) for j, (a, b) in enumerate(rows)]
            over = [(j, e) for j, e in over if e > _TOL * max(1.0, abs(rows[j][1]))]
            if not over:
                return picked
            for j, e in over:  # over by the solver's round-off: tighten that budget and retry
                rows[j] = (rows[j][0], rows[j][1] - 2 * e)
        return None

    def _milp(self, c: np.ndarray, rows: list[tuple[np.ndarray, float]], ub: np.ndarray) -> list[int] | None:
        g = len(self.groups)
        counts = np.diff(self.offsets)
        one_hot = csr_array(
            (np.ones(self.n), (np.repeat(np.arange(g), counts), np.arange(self.n))), shape=(g, self.n)
        )
        constraints = [LinearConstraint(one_hot, 1.0, 1.0)]
        for a, b in rows:  # each budget row scaled to coefficients <= 1 (tolerances are absolute)
            s = max(float(np.abs(a).max(initial=0.0)), abs(b), 1e-300)
            constraints.append(LinearConstraint(a[None, :] / s, -np.inf, b / s))
        with _quiet_stdout():
            res = milp(
                c,
                integrality=np.ones(self.n),
                bounds=Bounds(0.0, ub),
                constraints=constraints,
                options={"mip_rel_gap": MIP_REL_GAP, "time_limit": TIME_LIMIT_S},
            )
        if res.status == 2:
            return None
        if res.x is None:
            raise MpsearchError(f"the allocation solver failed: {res.message}")
        return [int(np.argmax(res.x[a:b])) for a, b in itertools.pairwise(self.offsets)]

    def allocation(self, picked: list[int], sensitivity, layer_costs, start: float) -> Allocation:
        chosen: dict[str, LayerChoice] = {}
        for group, opts, i in zip(self.groups, self.choices, picked, strict=True):
            chosen.update(dict.fromkeys(group, opts[i]))
        choices = {f: chosen[f] for f in self.fqns}
        objective = _fsum((_sensitivity(sensitivity, f, c) for f, c in choices.items()), "sensitivity")
        entries = [layer_costs[f][c] for f, c in choices.items()]
        common = [k for k in entries[0] if all(k in e for e in entries[1:])] if entries else []
        costs = {k: _fsum((float(e[k]) for e in entries), k) for k in common}
        return Allocation(choices, objective, costs, time.perf_counter() - start)


def _tie_groups(fqns: list[str], ties: Sequence[Sequence[str]]) -> list[list[str]]:
    """Layers grouped by ties (overlapping ties merge), each group in layer order."""
    parent = {f: f for f in fqns}

    def root(f: str) -> str:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    for tie in ties:
        for f in tie:
            if f not in parent:
                raise InvalidConfigError(f"tied layer {f!r} is not among the options")
        for f in tie[1:]:
            parent[root(f)] = root(tie[0])
    members: dict[str, list[str]] = {}
    for f in fqns:
        members.setdefault(root(f), []).append(f)
    return list(members.values())


def _undominated(rows: list[tuple[float, ...]]) -> list[int]:
    """Indices of the rows (sensitivity, *costs) no other row beats: no more in every column (of
    identical rows, the first is kept)."""
    return [
        i for i, r in enumerate(rows)
        if not any(j != i and all(a <= b for a, b in zip(q, r, strict=True)) and (q != r or j < i)
                   for j, q in enumerate(rows))
    ]


@contextlib.contextmanager
def _quiet_stdout():
    """Silence file descriptor 1 (HiGHS 1.12 prints a stray debug line there on some problems)."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
        null = os.open(os.devnull, os.O_WRONLY)
    except (OSError, ValueError, AttributeError):
        yield
        return
    try:
        os.dup2(null, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(null)


def _sensitivity(sensitivity: Mapping[str, Mapping[LayerChoice, float]], fqn: str, c: LayerChoice) -> float:
    try:
        v = float(sensitivity[fqn][c])
    except KeyError:
        raise InvalidConfigError(f"no sensitivity for layer {fqn} at {c.weight}/{c.activation}") from None
    if math.isnan(v) or v < 0:
        raise InvalidConfigError(f"sensitivity of layer {fqn} at {c.weight}/{c.activation} is {v}")
    return v


def _cost(layer_costs, fqn: str, c: LayerChoice, key: str) -> float:
    try:
        v = float(layer_costs[fqn][c][key])
    except KeyError:
        raise InvalidConfigError(f"no {key} cost for layer {fqn} at {c.weight}/{c.activation}") from None
    if math.isnan(v):
        raise InvalidConfigError(f"{key} cost of layer {fqn} at {c.weight}/{c.activation} is NaN")
    return v


def _fsum(values, what: str) -> float:
    """math.fsum; finite values whose total exceeds the float range (a cost of 1e308 s: a hardware
    profile built in code with a figure outside hw_models.profile.FIGURE_BOUNDS) are a one-line
    InvalidConfigError naming the total, not an OverflowError."""
    try:
        return math.fsum(values)
    except OverflowError:
        raise InvalidConfigError(f"the {what} total of an allocation overflows a float: a per-layer figure is "
                                 "out of range (see the profile bounds, hw_models.profile.FIGURE_BOUNDS)") from None


def _scale(v: np.ndarray) -> float:
    """A positive scale bringing the typical nonzero |v| to ~1 (solver gaps are absolute too)."""
    nz = np.abs(v[np.isfinite(v) & (v != 0)])
    return float(np.median(nz)) if nz.size else 1.0


def _check_budgets(budgets: Mapping[str, float]) -> None:
    for k, b in budgets.items():
        if math.isnan(float(b)):
            raise InvalidConfigError(f"budget {k} is NaN")


def solve_allocation(
    options: Mapping[str, Sequence[LayerChoice]],
    sensitivity: Mapping[str, Mapping[LayerChoice, float]],
    layer_costs: Mapping[str, Mapping[LayerChoice, Mapping[str, float]]],
    budgets: Mapping[str, float],
    ties: Sequence[Sequence[str]] = (),
    max_terms: Mapping[str, float] | None = None,
) -> Allocation | None:
    """The allocation of least total sensitivity whose cost totals meet `budgets`; None if none does.

    ties: groups of layers that must take the same choice. max_terms: per-layer limits (a choice
    whose layer_costs[L][c][k] exceeds max_terms[k] is excluded). Of two choices of a layer, one
    with no more sensitivity and no more of any budgeted cost is preferred.
    """
    start = time.perf_counter()
    _check_budgets(budgets)
    p = _Problem(options, layer_costs, list(budgets), ties, sensitivity, max_terms)
    picked = p.solve(p.flat(None), budgets)
    return None if picked is None else p.allocation(picked, sensitivity, layer_costs, start)


def min_total(
    options: Mapping[str, Sequence[LayerChoice]],
    layer_costs: Mapping[str, Mapping[LayerChoice, Mapping[str, float]]],
    key: str,
    ties: Sequence[Sequence[str]] = (),
) -> float:
    """The smallest achievable total of `key`: per (tied group of) layer(s) the cheapest choice."""
    p = _Problem(options, layer_costs, [key], ties)
    return _fsum((float(c.min()) for c in p.costs[key]), key) if p.feasible else math.inf


def sweep(
    options: Mapping[str, Sequence[LayerChoice]],
    sensitivity: Mapping[str, Mapping[LayerChoice, float]],
    layer_costs: Mapping[str, Mapping[LayerChoice, Mapping[str, float]]],
    key: str,
    n: int,
    *,
    budgets: Mapping[str, float] | None = None,
    ties: Sequence[Sequence[str]] = (),
    max_terms: Mapping[str, float] | None = None,
    near: float | None = None,
) -> list[Allocation]:
    """A sketch of the sensitivity / `key` front: the best allocation for n budgets of `key`.

    The budgets run from the least achievable total of `key` (under the other `budgets`) to the
    total of the least-sensitive allocation, spaced geometrically when the lower end is positive
    (the front is steepest near the smallest budget, and equal ratios are how budgets are stated:
    "20% smaller"), else evenly; n == 1 gives the smallest only. Each is solved with the other
    `budgets` as constraints. Returned in increasing `key`, keeping only allocations strictly
    less sensitive than every cheaper one (so each allocation once); [] if `budgets` cannot be met.

    near: with a budget on `key` itself, sweep only its neighbourhood: from (1 - near) times the
    upper end (the least-sensitive allocation within the budget, at most the budget) up to it,
    not the whole front down to the cheapest (a budgeted search wants the budget used well).
    """
    if n < 1:
        raise InvalidConfigError(f"a sweep needs at least one point, got n={n}")
    budgets = dict(budgets or {})
    _check_budgets(budgets)
    p = _Problem(options, layer_costs, [key, *budgets], ties, sensitivity, max_terms)
    cheapest = p.solve(p.flat(key), budgets)
    if cheapest is None:
        return []
    lo, hi = p.total(cheapest, key), p.total(p.solve(p.flat(None), budgets), key)
    if near is not None and key in budgets:
        lo = max(lo, hi * (1 - near))
    if n == 1 or hi <= lo:
        points = [lo]
    else:
        points = list(np.geomspace(lo, hi, n) if lo > 0 else np.linspace(lo, hi, n))
        points[0], points[-1] = lo, hi
    found: list[Allocation] = []
    for b in dict.fromkeys(points):
        start = time.perf_counter()
        picked = p.solve(p.flat(None), {**budgets, key: min(b, budgets.get(key, math.inf))})
        if picked is not None:
            found.append(p.allocation(picked, sensitivity, layer_costs, start))
    found.sort(key=lambda a: (a.costs[key], a.objective))
    front: list[Allocation] = []
    for a in found:
        if not front or a.objective < front[-1].objective:
            front.append(a)
    return front
