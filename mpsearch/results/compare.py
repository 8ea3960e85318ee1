"""Compare hardware targets on one search: each configuration scored once, priced on every target.

A configuration's metric does not depend on the target, only its cost does. `compare` runs one
search (mpsearch.api.search) in the space of the first target, by default over metric and BOPs
(the cost no target owns, so the search spreads over the accuracy-compression trade-off every
target shares, rather than chasing one target's latency), then prices every scored
configuration on every target (microseconds each). Per target: the Pareto front of metric
against that target's latency, and a table with, for each latency budget, the best metric within
it, its latency and memory and its speedup over FP32 and over uniform int8 on that target. A
configuration a target cannot run (a precision it lacks, or weights that do not fit) is off that
target's front only.

The budgets, per target: its FP32 latency, its uniform int8 latency (each where it runs them), the
latency of its fastest scored configuration + FASTEST_SLACK, and any --latency-budget (ms).

Written to OUT/compare.json (schema COMPARE_SCHEMA) beside the search's result.json:
  {"schema", "task", "targets": [names], "search": "result.json", "objectives",
   "per_target": {name: {"reference": {"fp32_latency_ms", "int8_latency_ms", "fp32_weight_bytes"},
                         "trials": {trial number: {"latency_ms", "weight_bytes", "peak_act_bytes",
                                                   "energy_mj", "feasible", "reason"}},
                         "pareto": [trial numbers, fastest first],
                         "best": the trial mpsearch.results.selection picks there (None: none),
                         "table": [{"budget_ms", "budget", "trial", "metric", "latency_ms",
                                    "weight_bytes", "speedup_fp32", "speedup_int8"}],
                         "breakdown": [per-layer latency of the target's best trial]}}}
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hw_models import Candidate, CostModel, HardwareProfile, Precision
from mpsearch.cache import atomic_write_bytes
from mpsearch.errors import InvalidConfigError
from mpsearch.results.records import SearchResult, TrialRecord, dumps_strict, layer_breakdown, pareto_front

COMPARE_SCHEMA = "mpsearch.compare/1"
FASTEST_SLACK = 0.05
FRONT_OBJECTIVES = ("metric", "latency")


@dataclasses.dataclass
class Comparison:
    """The search and, per target, its priced trials (TrialRecords with that target's costs)."""

    result: SearchResult
    targets: list[str]
    per_target: dict[str, dict[str, Any]]

    def view(self, target: str) -> SearchResult:
        """The search as if run on `target`: its costs, its feasibility, its front and best."""
        pt = self.per_target[target]
        trials = [_on_target(t, pt["trials"].get(t.number)) for t in self.result.trials]
        settings = {**self.result.settings, "objectives": list(FRONT_OBJECTIVES), "hv_reference": None}
        ref = {**self.result.reference, "fp32_latency_ms": pt["reference"]["fp32_latency_ms"],
               "fp32_weight_bytes": pt["reference"]["fp32_weight_bytes"]}
        return dataclasses.replace(self.result, target=target, trials=trials, settings=settings, reference=ref)

    def to_dict(self) -> dict[str, Any]:
        return {"schema": COMPARE_SCHEMA, "task": self.result.task, "targets": self.targets,
                "search": "result.json", "objectives": list(FRONT_OBJECTIVES),
                "per_target": {t: {**d, "trials": {str(k): v for k, v in d["trials"].items()}}
                               for t, d in self.per_target.items()}}

    def write(self, path: str | Path) -> None:
        atomic_write_bytes(path, (dumps_strict(self.to_dict(), indent=1) + "\n").encode())

    @classmethod
    def read(cls, out_dir: str | Path) -> Comparison:
        out_dir = Path(out_dir)
        d = json.loads((out_dir / "compare.json").read_text())
        if d.get("schema") != COMPARE_SCHEMA:
            raise InvalidConfigError(f"{out_dir / 'compare.json'}: schema {d.get('schema')!r}, expected {COMPARE_SCHEMA!r}")
        per = {t: {**v, "trials": {int(k): _latency_back(x) for k, x in v["trials"].items()}}
               for t, v in d["per_target"].items()}
        return cls(SearchResult.read(out_dir / d.get("search", "result.json")), list(d["targets"]), per)


def _latency_back(cost: dict) -> dict:
    """A priced trial read from compare.json: a null latency was infinite (a pair the target
    cannot run; strict JSON has no Infinity)."""
    return {**cost, "latency_ms": math.inf} if cost.get("latency_ms", 0.0) is None else cost


def _on_target(t: TrialRecord, cost: dict | None) -> TrialRecord:
    if cost is None:  # never priced there (a trial that failed before pricing): off the front
        return dataclasses.replace(t, feasible=False)
    state = t.state if cost["feasible"] or t.state != "complete" else "infeasible"
    return dataclasses.replace(t, latency_ms=cost["latency_ms"], weight_bytes=cost["weight_bytes"],
                               peak_act_bytes=cost["peak_act_bytes"], energy_mj=cost["energy_mj"],
                               feasible=cost["feasible"], state=state,
                               reason=cost["reason"] if not cost["feasible"] else t.reason)


def price_on_targets(result: SearchResult, layers, profiles: Sequence[HardwareProfile], batch_size: int = 1,
                     latency_budgets_ms: Sequence[float] = (), graph=None) -> Comparison:
    """Price every trial of `result` on every profile (weight bytes counted as the search counted
    them: settings.weight_bytes); fronts and budget tables per target."""
    fqns = [x.fqn for x in layers]
    counting = result.settings.get("weight_bytes", "with-scales")
    per_target, models = {}, {}
    for prof in profiles:
        model = models[prof.name] = CostModel(layers, prof, batch_size=batch_size, graph=graph,
                                               weight_counting=counting)
        priced = {}
        for t in result.trials:
            c = model.price(t.config)
            priced[t.number] = {"latency_ms": c.latency_ms, "weight_bytes": c.weight_bytes,
                                "peak_act_bytes": c.peak_act_bytes,
                                "energy_mj": None if c.energy_j is None else c.energy_j * 1e3,
                                "feasible": c.feasible, "reason": c.reason}
        fp32 = model.price(Candidate.uniform(fqns, Precision.FP32, Precision.FP32))
        int8 = model.price(Candidate.uniform(fqns, Precision.INT8, Precision.INT8))
        per_target[prof.name] = {
            "reference": {"fp32_latency_ms": fp32.latency_ms if fp32.feasible else None,
                          "int8_latency_ms": int8.latency_ms if int8.feasible else None,
                          "fp32_weight_bytes": fp32.weight_bytes},
            "trials": priced,
        }
    cmp = Comparison(result, [p.name for p in profiles], per_target)
    for name, pt in per_target.items():
        view = cmp.view(name)
        pt["pareto"] = pareto_front(view.trials, FRONT_OBJECTIVES)
        pt["table"] = budget_table(view, pt["reference"], latency_budgets_ms)
        best = pt["best"] = view.best
        pt["breakdown"] = [] if best is None else layer_breakdown(models[name], view.trial(best))
    return cmp


def budget_table(view: SearchResult, reference: dict, latency_budgets_ms: Sequence[float]) -> list[dict]:
    """For each latency budget, the best metric within it on this target (None: nothing fits)."""
    pool = [t for t in view.trials if t.state == "complete" and t.feasible]
    budgets = [(reference[k], label) for k, label in (("fp32_latency_ms", "fp32 latency"),
                                                       ("int8_latency_ms", "int8 latency")) if reference[k]]
    if pool:
        budgets.append((min(t.latency_ms for t in pool) * (1 + FASTEST_SLACK), f"fastest +{FASTEST_SLACK:.0%}"))
    budgets += [(b, f"{b:g} ms") for b in latency_budgets_ms]
    rows = []
    for budget_ms, label in budgets:
        fits = [t for t in pool if t.latency_ms <= budget_ms]
        best = min(fits, key=lambda t: (-t.metric, t.latency_ms, t.number)) if fits else None
        rows.append({
            "budget_ms": budget_ms, "budget": label, "trial": None if best is None else best.number,
            "metric": None if best is None else best.metric,
            "latency_ms": None if best is None else best.latency_ms,
            "weight_bytes": None if best is None else best.weight_bytes,
            "speedup_fp32": _ratio(reference["fp32_latency_ms"], best),
            "speedup_int8": _ratio(reference["int8_latency_ms"], best),
        })
    return rows


def _ratio(ref_ms: float | None, t: TrialRecord | None) -> float | None:
    return None if ref_ms is None or t is None or not t.latency_ms else ref_ms / t.latency_ms
