"""Which trial a search calls best: the cheapest configuration whose metric is within an allowed
drop of FP32.

A search ends with a front of trade-offs; the user needs one answer to act on. "The highest
metric" is the wrong one: on a small evaluation set a configuration can beat FP32 by one lucky
sample while running slower than FP32. So, like AIMET's allowed accuracy drop, best is:

  among the complete trials within every budget (latency, size, memory, and the drop budget:
  metric >= FP32 metric - max_drop), the best by the search's cost objectives: the fastest when
  latency is an objective, else the cheapest in the first cost objective (smallest weight memory,
  fewest BOPs, ...). Costs within COST_TIE (1%) of the cheapest are a tie: no cost model (nor a
  timer on a shared machine) resolves less, and one int4 layer in an int8 model predicted 0.01%
  faster is no reason to deploy it. Ties go to the higher metric, then the finer proxy (lower KL
  to FP32, else higher SQNR), then the cheaper, then the earlier trial. If no trial is within
  the drop, best falls back to the highest-metric trial, and says so (Best.within_drop False).

max_drop, in metric points (0.01: one point of accuracy in [0, 1]) or, given as "1%", in percent
of the FP32 metric. Without one, DEFAULT: the evaluation set's own noise.

A search with a budget (latency, size or memory) and no max_drop asks another question: the best
configuration that fits (as MCT and HAQ read a budget), not the cheapest one that is good enough.
Its best (DropBudget.mode "most_accurate") is the most accurate complete trial within the budgets;
trials whose metric is within the evaluation set's noise of the highest (the default drop, e.g. one
of 256 crops) are told apart by the finer proxy the evaluator computes on the same outputs: the
lowest KL to FP32 (kl_to_fp32) for classifiers, else the highest SQNR (sqnr_db); then the cheapest,
then the earliest. A given max_drop keeps the cheapest-within-the-drop rule, budgets or not.

  - A metric that is a share of samples (accuracy, top-1 agreement: `mpsearch.metrics.accuracy`
    or `top1_agreement`, or a metric named so, with FP32 in [0, 1]) over n evaluation samples:
    one standard error of the FP32 metric, sqrt(p (1 - p) / n), and at least one sample, 1 / n.
    The FP32 metric is itself an estimate on those n samples; a configuration within one standard
    error of it is not measurably worse on this set, and the set cannot resolve less than one
    sample (where p = 1, as top-1 agreement of FP32 with itself, the standard error is 0). On
    digits (p = 356/360, n = 360) that is 0.0055: two samples; on mobilenet_v2 (p = 1, n = 256)
    1/256: one crop.
  - Any other metric (cosine similarity, F1, ...): DEFAULT_RELATIVE_DROP (1%) of |FP32|, the usual
    "within 1% of FP32" target; counts give no standard error there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mpsearch.errors import InvalidConfigError
from mpsearch.results.objectives import value as objective_value

__all__ = ["COST_TIE", "DEFAULT_RELATIVE_DROP", "Best", "DropBudget", "cheapest", "default_drop", "drop_budget",
           "most_accurate", "parse_max_drop", "select_best"]

DEFAULT_RELATIVE_DROP = 0.01
# floats of a share of n samples (k / n) compared with a threshold computed in another order
_TOLERANCE = 1e-9
# what "best" means per ranking objective, for the printed summary
MODES = ("cheapest", "most_accurate")
# costs within this share of the cheapest within the drop are a tie (see the module doc)
COST_TIE = 0.01
# the finer proxy that tells apart trials whose metrics are within the evaluation set's noise:
# (proxy, sign): lower KL is better, higher SQNR is
FINER_PROXIES = (("kl_to_fp32", 1.0), ("sqnr_db", -1.0))
RANKED_BY = {"latency": "fastest", "weight_memory": "smallest weights", "activation_memory": "smallest peak activations",
             "bops": "fewest BOPs", "energy": "least energy"}


def parse_max_drop(value: float | str | None) -> tuple[float, bool] | None:
    """(amount, percent) from a max_drop as given: a number of metric points (0.01, "0.01") or a
    percentage of the FP32 metric ("1%", "0.5 %"); None: none given. InvalidConfigError for
    anything else, a negative or non-finite amount, or a percentage over 100."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidConfigError(f"max drop: expected a number of metric points or a percentage such as 1%, "
                                 f"got {value!r}")
    percent = isinstance(value, str) and value.strip().endswith("%")
    text = value.strip().removesuffix("%").strip() if isinstance(value, str) else value
    try:
        amount = float(text)
    except (TypeError, ValueError):
        raise InvalidConfigError(f"max drop: expected a number of metric points (0.01) or a percentage of the FP32 "
                                 f"metric (1%), got {value!r}") from None
    if not math.isfinite(amount) or amount < 0:
        raise InvalidConfigError(f"max drop: expected a finite amount of at least 0, got {value!r}")
    if percent and amount > 100:
        raise InvalidConfigError(f"max drop: a percentage of the FP32 metric is at most 100%, got {value!r}")
    return amount, percent


@dataclass(frozen=True)
class DropBudget:
    """How far below FP32 a configuration's metric may fall and still be chosen as best."""

    points: float  # in metric units
    min_metric: float  # fp32_metric - points
    source: str  # where the figure comes from, in words
    mode: str = "cheapest"  # or "most_accurate": a budgeted search without a max_drop (module doc)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def default_drop(fp32_metric: float, metric_name: str, n_samples: int | None, proportion: bool) -> tuple[float, str]:
    """(points, why) of the default drop budget (module doc)."""
    p = fp32_metric
    if proportion and n_samples and 0.0 <= p <= 1.0:
        se = math.sqrt(p * (1.0 - p) / n_samples)
        one = 1.0 / n_samples
        if se >= one:
            return se, (f"default: one standard error of the FP32 {metric_name} on {n_samples} evaluation samples, "
                        f"sqrt(p(1-p)/n)")
        return one, (f"default: one of {n_samples} evaluation samples, 1/n (one standard error of the FP32 "
                     f"{metric_name}, sqrt(p(1-p)/n) = {se:.3g}, is less)")
    return DEFAULT_RELATIVE_DROP * abs(p), f"default: {DEFAULT_RELATIVE_DROP:.0%} of the FP32 {metric_name}"


def drop_budget(max_drop: float | str | None, fp32_metric: float, metric_name: str,
                n_samples: int | None = None, proportion: bool = False) -> DropBudget:
    """The drop budget for `max_drop` as given (parse_max_drop), or the default when None."""
    parsed = parse_max_drop(max_drop)
    if parsed is None:
        points, source = default_drop(fp32_metric, metric_name, n_samples, proportion)
    elif parsed[1]:
        points = parsed[0] / 100 * abs(fp32_metric)
        source = f"given: {parsed[0]:g}% of the FP32 {metric_name}"
    else:
        points, source = parsed[0], f"given: {parsed[0]:g} {metric_name} points"
    return DropBudget(points, fp32_metric - points, source)


@dataclass(frozen=True)
class Best:
    """The chosen trial and how it was chosen (see the module doc)."""

    trial: int | None
    rule: str  # "fastest within the drop budget", ..., or "highest metric"
    objective: str | None  # the cost objective ranked by; None: by metric (fallback or legacy)
    within_drop: bool | None  # False: no trial within the drop (fell back); None: no drop budget
    max_drop: float | None
    min_metric: float | None
    source: str | None
    speedup_fp32: float | None  # FP32 latency / the best trial's latency (None: unknown)
    fastest_speedup_fp32: float | None  # the same for the fastest complete trial within the budgets
    mode: str = "cheapest"  # DropBudget.mode this was chosen by

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ranking_objective(objectives: Sequence[str]) -> str:
    """The cost objective best is ranked by: latency when it is an objective, else the first cost."""
    costs = [o for o in objectives if o != "metric"]
    return "latency" if "latency" in costs or not costs else costs[0]


def _cost(t, objective: str) -> float:
    v = objective_value(t, objective)
    return v if v is not None and math.isfinite(v) else math.inf


def most_accurate(pool: Sequence, noise: float, objective: str):
    """The most accurate of `pool` (complete trials within the budgets): among those whose metric
    is within `noise` of the highest, the best by the finer proxy (FINER_PROXIES, the first every one
    of them has), then the cheapest in `objective`, then the earliest; None for an empty pool."""
    if not pool:
        return None
    top = max(t.metric for t in pool)
    near = [t for t in pool if t.metric >= top - noise - _TOLERANCE * max(1.0, abs(top))]
    finer = _finer_proxy(near)
    return min(near, key=lambda t: (finer(t), _cost(t, objective), -t.metric, t.number))


def _finer_proxy(trials: Sequence):
    """t -> the first of FINER_PROXIES every one of `trials` has, signed so that lower is better
    (0 for all where none is common to them)."""
    proxy = next(((name, sign) for name, sign in FINER_PROXIES
                  if all(t.proxies.get(name) is not None and math.isfinite(t.proxies[name]) for t in trials)), None)
    return lambda t: 0.0 if proxy is None else proxy[1] * t.proxies[proxy[0]]


def cheapest(within: Sequence, objective: str):
    """The cheapest of `within` in `objective`, costs within COST_TIE of the lowest tied: among
    those the highest metric, then the finer proxy, then the cheapest, then the earliest."""
    low = min(_cost(t, objective) for t in within)
    tied = [t for t in within if _cost(t, objective) <= low * (1 + COST_TIE)] if math.isfinite(low) else list(within)
    finer = _finer_proxy(tied)
    return min(tied, key=lambda t: (-t.metric, finer(t), _cost(t, objective), t.number))


def select_best(trials: Sequence, reference: dict[str, Any], objectives: Sequence[str],
                drop: DropBudget | dict | None) -> Best:
    """The best trial of `trials` (TrialRecords) under `drop` (None: the highest metric, the rule of
    results written before drop budgets existed). Only complete trials within every budget
    (feasible) count."""
    pool = [t for t in trials if t.state == "complete" and t.feasible and t.metric is not None]
    fp32_ms = reference.get("fp32_latency_ms")

    def speedup(t) -> float | None:
        if t is None or not fp32_ms or not t.latency_ms or not math.isfinite(t.latency_ms):
            return None
        return fp32_ms / t.latency_ms

    fastest = min(pool, key=lambda t: (_cost(t, "latency"), -t.metric, t.number)) if pool else None
    highest = min(pool, key=lambda t: (-t.metric, t.latency_ms, t.number)) if pool else None
    if isinstance(drop, dict):
        drop = DropBudget(**{k: drop[k] for k in ("points", "min_metric", "source")}, mode=drop.get("mode", "cheapest"))
    if drop is None:
        return Best(None if highest is None else highest.number, "highest metric", None, None, None, None, None,
                    speedup(highest), speedup(fastest))
    objective = ranking_objective(objectives)
    threshold = drop.min_metric - _TOLERANCE * max(1.0, abs(drop.min_metric))
    if drop.mode == "most_accurate":
        best = most_accurate(pool, drop.points, objective)
        rule = "most accurate within the budgets (within the evaluation set's noise: the finer proxy, then the cost)"
        return Best(None if best is None else best.number, rule, objective, None if best is None else
                    best.metric >= threshold, drop.points, drop.min_metric, drop.source, speedup(best),
                    speedup(fastest), mode=drop.mode)
    within = [t for t in pool if t.metric >= threshold]
    if within:
        best = cheapest(within, objective)
        rule = f"{RANKED_BY.get(objective, 'cheapest ' + objective)} within the drop budget"
        return Best(best.number, rule, objective, True, drop.points, drop.min_metric, drop.source,
                    speedup(best), speedup(fastest))
    return Best(None if highest is None else highest.number, "highest metric (no trial within the drop budget)",
                None, False if pool else None, drop.points, drop.min_metric, drop.source, speedup(highest),
                speedup(fastest))




