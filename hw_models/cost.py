"""Pricing a candidate on a target: latency (roofline), weight memory, activation memory, BOPs.

Everything that does not depend on the candidate is tabulated once in `CostModel.__init__`
(one row per layer and precision pair), so pricing a candidate is a sum of table look-ups.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from hw_models.layers import Candidate, LayerChoice, LayerSpec
from hw_models.precision import Precision
from hw_models.profiles import HardwareProfile

SCALE_BYTES = 4  # one fp32 scale per output channel (integer) or per tensor (fp8)


def weight_bytes(layer: LayerSpec, precision: Precision) -> int:
    """Bytes to store the layer's weight at `precision`, quantization scales included.

    Integer weights are symmetric per output channel: packed b-bit values plus one fp32 scale
    per output channel (no zero point). fp8 carries one fp32 per-tensor scale. Bias is not counted.
    """
    payload = math.ceil(layer.weight_elems * precision.bits / 8)
    if precision.is_int:
        return payload + SCALE_BYTES * layer.out_channels
    if precision == Precision.FP8_E4M3:
        return payload + SCALE_BYTES
    return payload


def bops(layer: LayerSpec, choice: LayerChoice) -> int:
    """Bit operations per sample: MACs x weight bits x activation bits."""
    return layer.macs * choice.weight.bits * choice.activation.bits


@dataclass(frozen=True)
class LayerCost:
    """One layer at one precision pair, for the model's batch size."""

    fqn: str
    choice: LayerChoice
    supported: bool
    compute: str | None
    latency_s: float
    compute_s: float
    memory_s: float
    weight_bytes: int
    act_bytes: int
    bops: int

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class Cost:
    """What a candidate costs on a target. Infeasible candidates carry the reason."""

    latency_s: float
    weight_bytes: int
    peak_act_bytes: int
    bops: int
    energy_j: float | None
    feasible: bool
    reason: str = ""

    @property
    def latency_ms(self) -> float:
        return self.latency_s * 1e3


class CostModel:
    """Prices candidates of one model on one target at a fixed batch size.

    latency of a layer = max(compute time, memory time) + per-layer overhead, where
    compute time = batch x MACs / (peak x efficiency) of the arithmetic the target uses for
    the pair, and memory time = (weight bytes + batch x activation bytes) / bandwidth, with
    input activations moved at their precision and outputs at fp32. Network latency is the
    sum over layers.
    """

    def __init__(self, layers: Sequence[LayerSpec], profile: HardwareProfile, batch_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        self.layers = tuple(layers)
        self.profile = profile
        self.batch_size = batch_size
        self._table: dict[tuple[str, LayerChoice], LayerCost] = {}
        for layer in self.layers:
            for rule in profile.rules:
                choice = LayerChoice(rule.weight, rule.activation)
                self._table[(layer.fqn, choice)] = self._layer_cost(layer, choice)

    def _layer_cost(self, layer: LayerSpec, choice: LayerChoice) -> LayerCost:
        p = self.profile
        rule = p.rule(choice.weight, choice.activation)
        wb = weight_bytes(layer, choice.weight)
        act = math.ceil(layer.in_elems * choice.activation.bits / 8) + layer.out_elems * 4
        b = bops(layer, choice)
        if rule is None:
            return LayerCost(layer.fqn, choice, False, None, math.inf, math.inf, math.inf, wb, act, b)
        compute_s = self.batch_size * layer.macs / p.effective_macs_per_s(rule.compute)
        memory_s = (wb + self.batch_size * act) / p.mem_bw_bytes_per_s
        latency = max(compute_s, memory_s) + p.layer_overhead_s
        return LayerCost(layer.fqn, choice, True, rule.compute, latency, compute_s, memory_s, wb, act, b)

    def layer_cost(self, fqn: str, choice: LayerChoice) -> LayerCost:
        cost = self._table.get((fqn, choice))
        if cost is None:  # a pair with no rule on this target
            layer = next(x for x in self.layers if x.fqn == fqn)
            cost = self._layer_cost(layer, choice)
        return cost

    def breakdown(self, candidate: Candidate) -> list[LayerCost]:
        """Per-layer costs of a candidate, in execution order."""
        return [self.layer_cost(layer.fqn, candidate[layer.fqn]) for layer in self.layers]

    def price(self, candidate: Candidate) -> Cost:
        latency = 0.0
        wbytes = 0
        peak_act = 0
        total_bops = 0
        reason = ""
        for layer in self.layers:
            c = self.layer_cost(layer.fqn, candidate[layer.fqn])
            if not c.supported and not reason:
                reason = (
                    f"{self.profile.name} cannot run layer {layer.fqn} with weight {c.choice.weight} "
                    f"/ activation {c.choice.activation}"
                )
            latency += c.latency_s
            wbytes += c.weight_bytes
            total_bops += c.bops
            peak_act = max(peak_act, c.act_bytes)
        return Cost(
            latency_s=latency,
            weight_bytes=wbytes,
            peak_act_bytes=peak_act * self.batch_size,
            bops=total_bops,
            energy_j=None,
            feasible=not reason,
            reason=reason,
        )
