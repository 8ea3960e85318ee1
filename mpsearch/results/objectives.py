"""Search objectives, budgets, the Pareto front over any of them, and its hypervolume.

Objectives (names as on the command line):
  metric             the task metric, maximized
  latency            predicted latency (ms), minimized
  weight_memory      weight bytes incl. scales and zero points, minimized
  activation_memory  peak activation bytes over the execution order, minimized
  bops               bit operations, minimized
  energy             predicted energy (mJ), minimized; needs a profile with energy figures

Budgets are constraints on cost: latency (ms), size (weight memory, MB) and memory (weights
plus peak activations: what must be resident at once, MB).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import moocore
import numpy as np

from mpsearch.errors import InvalidConfigError


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" or "minimize"
    attr: str  # TrialRecord attribute
    unit: str
    help: str


OBJECTIVES = {
    o.name: o
    for o in (
        Objective("metric", "maximize", "metric", "", "the task metric"),
        Objective("latency", "minimize", "latency_ms", "ms", "predicted latency"),
        Objective("weight_memory", "minimize", "weight_bytes", "B", "weight bytes incl. scales"),
        Objective("activation_memory", "minimize", "peak_act_bytes", "B", "peak activation bytes"),
        Objective("bops", "minimize", "bops", "", "bit operations"),
        Objective("energy", "minimize", "energy_mj", "mJ", "predicted energy"),
    )
}
DEFAULT_OBJECTIVES = ("metric", "latency")
MB = 1e6


def parse_objectives(names: str | Sequence[str] | None) -> tuple[str, ...]:
    """Validated objective names: "metric" plus at least one cost, no repeats."""
    if names is None:
        return DEFAULT_OBJECTIVES
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = tuple(names)
    for n in names:
        if n not in OBJECTIVES:
            raise InvalidConfigError(f"unknown objective {n!r} (known: {', '.join(OBJECTIVES)})")
    if len(set(names)) != len(names):
        raise InvalidConfigError(f"objective listed twice in {','.join(names)}")
    if "metric" not in names or len(names) < 2:
        raise InvalidConfigError(f"objectives must include metric and at least one cost, got {','.join(names)}")
    return ("metric", *(n for n in names if n != "metric"))


def value(record, name: str) -> float | None:
    return getattr(record, OBJECTIVES[name].attr)


def minimized(record, objectives: Sequence[str]) -> tuple[float, ...]:
    """The record's objective values, metric negated, so that lower is better in every one."""
    out = []
    for n in objectives:
        v = value(record, n)
        out.append(-v if OBJECTIVES[n].direction == "maximize" else v)
    return tuple(out)


def pareto_front(trials, objectives: Sequence[str] = DEFAULT_OBJECTIVES) -> list[int]:
    """Trial numbers of the non-dominated complete, feasible trials over `objectives`, ordered
    by the first cost objective. A configuration repeated in several trials appears once, under
    its first trial, and so do trials with equal objective values (moocore.is_nondominated keeps
    the first of equal points; the trials are sorted by their values, then their numbers)."""
    pool = [t for t in trials if t.state == "complete" and t.feasible and t.duplicate_of is None]
    if not pool:
        return []
    items = sorted((minimized(t, objectives), t.number) for t in pool)
    keep = moocore.is_nondominated(np.asarray([v for v, _ in items], dtype=float), keep_weakly=False)
    front = [item for item, k in zip(items, keep, strict=True) if k]
    return [n for v, n in sorted(front, key=lambda fn: (fn[0][1:], fn[0][0], fn[1]))]


def hypervolume(points: Sequence[Sequence[float]], reference: Sequence[float]) -> float:
    """Hypervolume dominated by `points` (every coordinate minimized) up to `reference`; points
    not strictly better than the reference in every coordinate add nothing. Exact (moocore)."""
    ref = np.asarray(reference, dtype=float)
    pts = np.asarray([p for p in points if all(a < b for a, b in zip(p, ref, strict=True))], dtype=float)
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=ref))


def reference_point(objectives: Sequence[str], fp32_metric: float, upper: dict[str, float]) -> dict[str, float]:
    """The hypervolume's reference point, in each objective's own direction: the metric at
    fp32_metric - |fp32_metric| (0 for a positive metric such as accuracy), each cost at `upper`
    (an upper bound of that cost over the space: each layer's most expensive choice summed,
    transitions left out)."""
    out = {}
    for n in objectives:
        out[n] = fp32_metric - abs(fp32_metric) if n == "metric" else upper[n]
    return out


def front_hypervolume(trials, objectives: Sequence[str], reference: dict[str, float]) -> float:
    front = set(pareto_front(trials, objectives))
    pts = [minimized(t, objectives) for t in trials if t.number in front]
    ref = [(-reference[n] if OBJECTIVES[n].direction == "maximize" else reference[n]) for n in objectives]
    return hypervolume(pts, ref) if all(math.isfinite(r) for r in ref) else float("nan")
