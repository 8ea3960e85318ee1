"""Budgets: the cost constraints of a search, as given and as the numbers the loop checks.

A budget is given as a number (latency in ms, size and memory in MB) or relative to the target's
own uniform configurations: "0.5xfp32" (half the FP32 model's cost on the target) or "75%int8"
(three quarters of uniform int8's), for any of the three budgets. The references are those
result.json reports: FP32 everywhere, and int8/int8 everywhere except the layers that read the
model's input, which keep fp32 activations (result.json's reference.int8_*), priced by the
search's cost model with the deployed graph's conversions. `resolve` turns the relative ones
into numbers once the cost model is known; a reference the target cannot run is a BudgetError.

Weight bytes (the size budget, the memory budget's weights, the weight_memory objective) count
the integer weights' per-channel fp32 scales by default ("with-scales", what the exported graph
stores); "payload" counts the packed weight values alone, as tools that budget kernel bytes do
(hw_models.cost.WEIGHT_BYTES).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from hw_models import Candidate, Cost, CostModel, LayerChoice, Precision
from mpsearch.errors import BudgetError, InvalidConfigError

KINDS = {"latency": "ms", "size": "MB", "memory": "MB"}
REFERENCES = ("fp32", "int8")
_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(%|x)\s*(fp32|int8)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Relative:
    """A budget relative to a reference configuration: factor x the reference's cost."""

    factor: float
    reference: str  # "fp32" or "int8"
    text: str  # as given

    def __str__(self) -> str:
        return self.text


def parse_budget(value, kind: str) -> float | Relative | None:
    """A budget as given (a positive number, its text, or a relative form such as "0.5xfp32" or
    "75%int8") as a number or a Relative; None stays None. InvalidConfigError in one line
    naming the forms otherwise."""
    unit = KINDS[kind]
    if value is None:
        return None
    if isinstance(value, Relative):
        return value
    bad = InvalidConfigError(f"the {kind} budget must be a positive, finite number of {unit}, or relative to the "
                             f"target's uniform fp32 or int8 such as 0.5xfp32 or 75%int8; got {value!r}")
    if isinstance(value, str):
        m = _RELATIVE.match(value)
        if m:
            factor = float(m.group(1)) / (100 if m.group(2) == "%" else 1)
            if not (factor > 0 and math.isfinite(factor)):
                raise bad
            return Relative(factor, m.group(3).lower(), value.strip())
        try:
            value = float(value)
        except ValueError:
            raise bad from None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value > 0 and math.isfinite(value)):
        raise bad
    return float(value)


def reference_candidate(layers, reference: str, fp32_activation_layers=()) -> Candidate:
    """Uniform FP32, or uniform int8 with fp32 activations on the layers that read the model's
    input (as result.json's int8 reference is priced)."""
    if reference == "fp32":
        return Candidate.uniform([x.fqn for x in layers], Precision.FP32, Precision.FP32)
    fp32_act = set(fp32_activation_layers)
    return Candidate((x.fqn, LayerChoice(Precision.INT8, Precision.FP32 if x.fqn in fp32_act else Precision.INT8))
                     for x in layers)


def _quantity(cost: Cost, kind: str) -> float:
    if kind == "latency":
        return cost.latency_ms
    if kind == "size":
        return cost.weight_bytes / MB
    return (cost.weight_bytes + cost.peak_act_bytes) / MB


MB = 1e6


@dataclass(frozen=True)
class Budgets:
    """Cost constraints: latency (ms), size (weight bytes) and memory (weight bytes plus peak
    activation bytes); None: no budget."""

    latency_ms: float | None = None
    size_bytes: float | None = None
    memory_bytes: float | None = None

    def overruns(self, cost: Cost) -> dict[str, float]:
        """Constraint name -> how far over budget (<= 0: within), for the budgets set."""
        out = {}
        if self.latency_ms is not None:
            out["latency_over_budget_ms"] = cost.latency_ms - self.latency_ms
        if self.size_bytes is not None:
            out["size_over_budget_mb"] = (cost.weight_bytes - self.size_bytes) / 1e6
        if self.memory_bytes is not None:
            out["memory_over_budget_mb"] = (cost.weight_bytes + cost.peak_act_bytes - self.memory_bytes) / 1e6
        return out

    def reason(self, cost: Cost) -> str:
        over = []
        if self.latency_ms is not None and cost.latency_ms > self.latency_ms:
            over.append(f"latency {cost.latency_ms:.4g} ms is over the budget of {self.latency_ms:g} ms")
        if self.size_bytes is not None and cost.weight_bytes > self.size_bytes:
            over.append(f"weights {cost.weight_bytes / 1e6:.4g} MB are over the size budget of "
                        f"{self.size_bytes / 1e6:g} MB")
        if self.memory_bytes is not None and cost.weight_bytes + cost.peak_act_bytes > self.memory_bytes:
            over.append(f"weights + peak activations {(cost.weight_bytes + cost.peak_act_bytes) / 1e6:.4g} MB "
                        f"are over the memory budget of {self.memory_bytes / 1e6:g} MB")
        return "; ".join(over)

    def ilp_limits(self) -> dict[str, float]:
        """The budgets as limits on the ILP's additive per-layer costs (mpsearch.engine.ilp): latency in
        seconds (conversions left out), and weight bytes under the size budget and under the
        memory budget (weights alone must fit it; activations are checked when pricing)."""
        limits = {}
        if self.latency_ms is not None:
            limits["latency_s"] = self.latency_ms / 1e3
        caps = [b for b in (self.size_bytes, self.memory_bytes) if b is not None]
        if caps:
            limits["weight_bytes"] = min(caps)
        return limits

    def to_dict(self) -> dict[str, float | None]:
        return {"latency_ms": self.latency_ms, "size_mb": None if self.size_bytes is None else self.size_bytes / 1e6,
                "memory_mb": None if self.memory_bytes is None else self.memory_bytes / 1e6}



NO_BUDGETS = Budgets()


def resolve(given: dict[str, float | Relative | None], cost_model: CostModel,
            fp32_activation_layers=()) -> Budgets:
    """The budgets as numbers: {"latency": ms, "size": MB, "memory": MB} as given (parse_budget),
    a relative one priced against its reference configuration by `cost_model`."""
    values = {}
    for kind, v in given.items():
        if isinstance(v, Relative):
            cost = cost_model.price(reference_candidate(cost_model.layers, v.reference, fp32_activation_layers))
            if not cost.feasible:
                raise BudgetError(f"{kind} budget {v}: the target {cost_model.profile.name} cannot run uniform "
                                  f"{v.reference} ({cost.reason}); give the budget in {KINDS[kind]}")
            v = v.factor * _quantity(cost, kind)
        values[kind] = v
    return Budgets(values.get("latency"), None if values.get("size") is None else values["size"] * MB,
                   None if values.get("memory") is None else values["memory"] * MB)
