"""Search strategies: which candidates a search tries before (or instead of) its sampler.

  optuna      the sampler alone
  ilp         per-layer sensitivities (mpsearch.engine.sensitivity), then the budgeted allocation solved
              exactly as an integer linear program over a sweep of budgets (mpsearch.engine.ilp): each
              solution is one trial, and the search ends when they run out
  hybrid      (default) uniform int8 (where the space has it and it fits the budgets) and those
              ILP solutions first, enqueued as the study's first trials, then the sampler refines
              from them instead of starting blind

With a budget on the swept cost (a size budget when weight memory is the first cost objective, a
latency budget when latency is), the sweep covers the budget's neighbourhood (NEAR_BUDGET) rather
than the whole front: the configurations a budgeted search is after use the budget well. A hybrid
search whose best is the most accurate within its budgets (a budget and no max_drop) then refines
around its best trial and stops when that stops improving (mpsearch.engine.refine).
  exhaustive  every candidate of the space, refused above `exhaustive_limit` candidates
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hw_models import Candidate, CostModel, Precision
from mpsearch.defaults import DEFAULT_SENSITIVITY
from mpsearch.engine.budgets import Budgets
from mpsearch.engine.refine import Refiner, default_patience
from mpsearch.errors import InvalidConfigError
from mpsearch.results.selection import DropBudget
from mpsearch.scoring.evaluator import Evaluator
from search_spaces import SearchSpace, SpaceError

# additive per-layer cost the ILP sweeps, per cost objective (activation memory is a peak, not a sum)
SWEEP_KEY = {"latency": "latency_s", "weight_memory": "weight_bytes", "bops": "bops", "energy": "energy_j"}
# with a budget on the swept cost, the ILP seeds lie within this share under the least-sensitive
# allocation the budget allows (ilp.sweep's `near`), not along the whole front
NEAR_BUDGET = 0.15


@dataclass
class Plan:
    """The candidates a strategy proposes first, and what finding them cost."""

    seeds: Iterable[Candidate]
    n_seeds: int
    seeds_only: bool  # the search ends when the seeds run out
    setup_s: dict[str, float] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    refiner: Refiner | None = None  # a budgeted hybrid search: the budget's neighbourhood after the seeds


def check_strategy(strategy: str, space: SearchSpace, exhaustive_limit: int) -> None:
    """The exhaustive strategy enumerates at most `exhaustive_limit` candidates (a strategy's name
    is checked with the other options: mpsearch.engine.options.SearchOptions)."""
    if strategy == "exhaustive" and space.size > exhaustive_limit:
        raise InvalidConfigError(
            f"the space has {space.size:.4g} candidates (10^{space.log10_size:.1f}), over the exhaustive "
            f"limit of {exhaustive_limit}: restrict precisions, tie or pin layers, or use another strategy"
        )


def default_seed_count(n_trials: int) -> int:
    """ILP solutions a hybrid search starts from: a tenth of the trials, at least 2 (on the
    search-quality benchmark a third left the sampler too few trials; a tenth matched TPE's
    front at 100 trials and beat it at 50)."""
    return max(2, n_trials // 10)


def plan(
    strategy: str,
    space: SearchSpace,
    cost_model: CostModel,
    evaluator: Evaluator,
    *,
    budgets: Budgets,
    objectives: Sequence[str],
    n_trials: int,
    n_seeds: int | None = None,
    tried: Iterable[Candidate] = (),
    cache_dir: Path | None = None,
    progress: bool = True,
    drop: DropBudget | None = None,
    patience: int | None = None,
    sensitivity: str = DEFAULT_SENSITIVITY,
) -> Plan:
    """The seeds of `strategy` (see the module doc), leaving out candidates already `tried`; for a
    hybrid search whose best is the most accurate within its budgets (`drop` mode "most_accurate"),
    the Refiner that follows the seeds (mpsearch.engine.refine; `patience`: trials without a better
    one before it stops the search, 0: never)."""
    tried = set(tried)
    if strategy == "optuna":
        return Plan((), 0, False)
    if strategy == "exhaustive":
        return Plan((c for c in space.enumerate() if c not in tried), space.size - len(tried), True,
                    info={"space_size": space.size})
    from mpsearch.engine.ilp import choice_costs, sweep
    from mpsearch.engine.sensitivity import measure_sensitivity

    options = {o.fqn: list(o.pairs) for o in space.options}
    t0 = time.perf_counter()
    sens = measure_sensitivity(evaluator, options, cache_dir=cache_dir, progress=progress, method=sensitivity)
    t1 = time.perf_counter()
    key = next((SWEEP_KEY[o] for o in objectives if o in SWEEP_KEY), "latency_s")
    limits = budgets.ilp_limits()
    costs = choice_costs(cost_model, options)
    want = n_trials if strategy == "ilp" else (n_seeds or default_seed_count(n_trials))
    # The ILP sums per-layer costs and cannot see the conversions a change of compute kind
    # between adjacent layers costs (on CPUs often more than the layers it speeds up). So the
    # sweep runs over the whole space and, when latency is swept or budgeted, over each
    # single-compute-kind subspace (every layer on int8 kernels, say, with its weight precision
    # free), which has no conversions at all.
    latency_matters = key == "latency_s" or budgets.latency_ms is not None
    groups = [options, *(_single_kind_options(options, cost_model) if latency_matters else [])]
    allocations = []
    for i, opts in enumerate(groups):
        # at least the two ends of each sweep: the cheapest allocation and the least sensitive one
        share = max(2, want // len(groups) + (1 if i < want % len(groups) else 0))
        allocations += sweep(opts, sens.values, costs, key, share, budgets=limits, ties=space.ties,
                             near=NEAR_BUDGET)
    seeds = []
    for a in allocations:
        c = Candidate((f, a.choices[f]) for f in space.fqns)
        if budgets.latency_ms is not None:
            c = _within_latency(c, a, budgets.latency_ms, cost_model, options, sens.values, costs, limits, space)
        if c is not None and c not in tried and c not in seeds:
            seeds.append(c)
    n_ilp = len(seeds)
    # a hybrid search tries uniform int8 first: the configuration most deployments start from, and
    # where int4 runs on int8 kernels (CPUs, most GPUs) often the fastest one within the drop, which
    # a sweep of BOPs or of weight bytes may never propose (a compare then called slower ones best)
    int8 = _uniform_int8(space, cost_model, budgets) if strategy == "hybrid" else None
    if int8 is not None and int8 not in tried and int8 not in seeds:
        seeds.insert(0, int8)
    t2 = time.perf_counter()
    if progress:
        how = {"fisher": "estimated", "suffix": "measured", "full": "measured"}.get(sens.path, "cached")
        print(f"mpsearch: {strategy}: sensitivity of {sum(len(v) for v in sens.values.values())} layer choices "
              f"({how}; {sens.from_cache} from the cache) in {t1 - t0:.1f} s, {len(seeds)} ILP solutions over the "
              f"{key} sweep in {t2 - t1:.2f} s{', uniform int8 first' if len(seeds) > n_ilp else ''}", file=sys.stderr)
    refiner = None
    if strategy == "hybrid" and drop is not None and drop.mode == "most_accurate":
        refiner = Refiner(space, cost_model, budgets, sens.values, drop, objectives,
                          default_patience(n_trials) if patience is None else patience)
    return Plan(seeds, len(seeds), strategy == "ilp",
                setup_s={"sensitivity_s": t1 - t0, "ilp_s": t2 - t1},
                info={"sensitivity_measure": sens.measure, "sensitivity_path": sens.path,
                      "ilp_solutions": n_ilp, "uniform_int8_seed": len(seeds) > n_ilp, "sweep": key,
                      **({"patience": refiner.patience} if refiner else {})}, refiner=refiner)


def _uniform_int8(space: SearchSpace, cost_model: CostModel, budgets: Budgets) -> Candidate | None:
    """Every layer at int8 weights and int8 activations (fp32 where the space keeps a layer's
    activations fp32), if the space has it, the target runs it and it fits the budgets."""
    cand = space.uniform(Precision.INT8, Precision.INT8)
    if any(c.weight != Precision.INT8 or c.activation not in (Precision.INT8, Precision.FP32) for c in cand.values()):
        return None
    try:
        space.params(cand)  # inside the space: every pair allowed, ties kept
    except SpaceError:
        return None
    cost = cost_model.price(cand)
    if not cost.feasible or any(v > 0 for v in budgets.overruns(cost).values()):
        return None
    return cand


def _within_latency(cand, alloc, budget_ms, cost_model, options, sensitivity, costs, limits, space, tries=4):
    """The ILP sums per-layer latencies; the cost model adds the conversions between compute
    kinds. A solution over the latency budget once priced is solved again with the ILP's latency
    limit lowered by the excess (a few times); None if it never fits."""
    from mpsearch.engine.ilp import solve_allocation

    limit = limits.get("latency_s", alloc.costs.get("latency_s", 0.0))
    for _ in range(tries):
        over = cost_model.price(cand).latency_ms - budget_ms
        if over <= 0:
            return cand
        limit -= over / 1e3
        alloc = solve_allocation(options, sensitivity, costs, {**limits, "latency_s": limit}, ties=space.ties)
        if alloc is None:
            return None
        cand = Candidate((f, alloc.choices[f]) for f in space.fqns)
    return cand if cost_model.price(cand).latency_ms <= budget_ms else None


def _single_kind_options(options, cost_model) -> list[dict]:
    """Per compute kind every layer can use, the options restricted to pairs computed that way."""
    kinds: dict[str, dict] = {}
    for fqn, pairs in options.items():
        for c in pairs:
            k = cost_model.layer_cost(fqn, c).compute
            if k is not None:
                kinds.setdefault(k, {}).setdefault(fqn, []).append(c)
    return [per for per in kinds.values() if len(per) == len(options)]
