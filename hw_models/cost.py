"""Pricing a candidate on a target: latency (roofline), weight memory, activation memory, BOPs.

Everything that does not depend on the candidate is tabulated once in `CostModel.__init__`
(one row per layer and precision pair), so pricing a candidate is a sum of table look-ups.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from hw_models.graph import Boundary, DeployGraph
from hw_models.layers import Candidate, LayerChoice, LayerSpec
from hw_models.precision import Precision
from hw_models.profile import HardwareProfile

SCALE_BYTES = 4  # one fp32 scale per output channel (integer) or per tensor (fp8)
# how weight bytes are counted (Cost.weight_bytes, the size and memory budgets, the weight_memory
# objective): "with-scales", what a deployed graph stores; "payload", the packed values alone.
# Latency and capacity checks always move and hold the stored bytes.
WEIGHT_BYTES = ("with-scales", "payload")
GRAPH_KINDS = ("int8", "fp32")  # compute kinds the deployed-graph mode prices (hw_models.graph's rule)


def weight_bytes(layer: LayerSpec, precision: Precision, counting: str = "with-scales") -> int:
    """Bytes to store the layer's weight at `precision`, quantization scales included
    (counting "with-scales") or the packed values alone ("payload").

    Integer weights are symmetric per output channel: packed b-bit values plus one fp32 scale
    per output channel (no zero point). fp8 carries one fp32 per-tensor scale. Bias is not counted.
    """
    if counting not in WEIGHT_BYTES:
        raise ValueError(f"weight byte counting must be one of {', '.join(WEIGHT_BYTES)}, got {counting!r}")
    payload = math.ceil(layer.weight_elems * precision.bits / 8)
    if counting == "payload":
        return payload
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
    """One layer at one precision pair, for the model's batch size.

    transition_s: converting this layer's input from the previous layer's compute kind (0 in
    the table; filled in by `CostModel.breakdown`, which knows the neighbours).
    """

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
    energy_j: float | None = None
    transition_s: float = 0.0
    stored_bytes: int | None = None  # the weight as stored (with scales) where weight_bytes counts the payload

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


@dataclass(frozen=True)
class Cost:
    """What a candidate costs on a target. Infeasible candidates carry the reason.

    latency_s includes `transitions` conversions between compute kinds (transition_s of it).
    """

    latency_s: float
    weight_bytes: int
    peak_act_bytes: int
    bops: int
    energy_j: float | None
    feasible: bool
    reason: str = ""
    transitions: int = 0
    transition_s: float = 0.0

    @property
    def latency_ms(self) -> float:
        return self.latency_s * 1e3


class CostModel:
    """Prices candidates of one model on one target at a fixed batch size.

    latency of a layer = max(compute time, memory time) + per-layer overhead, where
    compute time = batch x MACs / (peak x efficiency) of the arithmetic the target uses for
    the pair, and memory time = (weight bytes + batch x activation bytes) / bandwidth, with
    input activations moved at their precision and outputs at fp32.

    Network latency = the sum over layers + transitions: wherever the compute kind changes
    between adjacent layers in execution order (and from / to the profile's io_compute at the
    model's input and output), the activation handed over is converted, at
    transition_overhead_s + batch x elements x transition_bytes_per_elem / bandwidth.

    Deployed-graph mode: given the model's DeployGraph (hw_models.graph) and a candidate whose
    layers all compute in int8 or fp32, the conversions are those the deployed graph really has:
    a QuantizeLinear on each int8 layer reading a float tensor, a DequantizeLinear on each int8
    tensor a float op reads (residual Adds and poolings included: one left float between int8
    layers costs its conversions), each at transition_overhead_s + batch x elements x
    quantize_bytes_per_elem (dequantize_bytes_per_elem) / bandwidth; layers cost their own
    (measured) latency, without the chain's in-context entries.

    Peak activation memory: the largest (input at its precision + output at the precision the
    next layer reads) over the execution order, times the batch (tensors kept alive by
    residual connections are not counted). Energy (when the profile has per-MAC figures):
    batch x MACs x pJ/MAC of the compute kind, plus bytes moved x pJ/byte when known.
    A profile's weight or activation capacity makes a candidate that does not fit infeasible.
    Pricing is table look-ups: a few microseconds per layer.

    Lookup-table mode: when the profile carries a LayerTable measured on this model (every
    layer present with the same MACs, same batch size), a layer's latency is the measured one
    for its compute kind (the roofline where the table has no entry), "<kind>@exit" where the
    next layer uses another compute kind (measured on a layer between two of another kind, so
    it includes its input conversion: no transition is added for it when the previous layer
    is of another kind too), and the model's measured non-layer time is added once. Where the
    table holds a layer's time in context, "<prev>><own>><next>" (the compute kinds of the layer
    before it, its own and the one after it; io_compute at the model's ends), that is the
    layer's whole contribution, conversions included (`in_context`).
    """

    def __init__(self, layers: Sequence[LayerSpec], profile: HardwareProfile, batch_size: int = 1,
                 graph: DeployGraph | None = None, weight_counting: str = "with-scales"):
        if batch_size < 1:
            raise ValueError(f"batch size must be >= 1, got {batch_size}")
        if weight_counting not in WEIGHT_BYTES:
            raise ValueError(f"weight byte counting must be one of {', '.join(WEIGHT_BYTES)}, got {weight_counting!r}")
        self.weight_counting = weight_counting
        self.layers = tuple(layers)
        self.profile = profile
        self.batch_size = batch_size
        self.graph = graph
        t = profile.layer_table
        self.measured = (
            t is not None
            and t.batch_size == batch_size
            and all(x.fqn in t.layers and t.layers[x.fqn].get("macs") == x.macs for x in self.layers)
        )
        self._table: dict[tuple[str, LayerChoice], LayerCost] = {}
        for layer in self.layers:
            for rule in profile.rules:
                choice = LayerChoice(rule.weight, rule.activation)
                self._table[(layer.fqn, choice)] = self._layer_cost(layer, choice)
        # measured latency of a layer whose successor uses another compute kind ("int8@exit":
        # ONNX Runtime runs an int8 layer whose output is not quantized as a float convolution)
        self._exit: dict[tuple[str, str], float] = {}
        # measured latency of a layer given the compute kinds before and after it ("<prev>><own>><next>",
        # conversions included; fitted end to end by `mpsearch calibrate`)
        self._state: dict[tuple[str, str], float] = {}
        if self.measured:
            for layer in self.layers:
                for key, v in profile.layer_table.layers[layer.fqn].items():
                    if key.endswith("@exit"):
                        self._exit[(layer.fqn, key.removesuffix("@exit"))] = v
                    elif key.count(">") == 2:
                        self._state[(layer.fqn, key)] = v
        # conversion of each layer's input, and of the model's output
        self._in_transition = [self.transition_s(layer.in_elems) for layer in self.layers]
        self._out_transition = self.transition_s(self.layers[-1].out_elems) if self.layers else 0.0

    def boundary_s(self, kind: str, elems: int) -> float:
        """Seconds of one QuantizeLinear ("q") or DequantizeLinear ("dq") of `elems` elements per
        sample in the deployed graph."""
        p = self.profile
        per = p.quantize_bytes_per_elem if kind == "q" else p.dequantize_bytes_per_elem
        if per is None:
            per = p.transition_bytes_per_elem
        return p.transition_overhead_s + self.batch_size * elems * per / p.mem_bw_bytes_per_s

    def boundaries(self, candidate: Candidate, costs: Sequence[LayerCost] | None = None) -> list[Boundary] | None:
        """The deployed graph's conversions for `candidate` (deployed-graph mode, class doc), or None
        when the chain model prices it (no graph, or a layer computing in another kind)."""
        if self.graph is None:
            return None
        costs = costs if costs is not None else [self.layer_cost(x.fqn, candidate[x.fqn]) for x in self.layers]
        if not all(c.supported and c.compute in GRAPH_KINDS for c in costs):
            return None
        return self.graph.boundaries(self.graph.plan(dict(candidate.items())))

    def transition_s(self, elems: int) -> float:
        """Seconds to convert an activation of `elems` elements per sample between compute kinds."""
        p = self.profile
        if not (p.transition_overhead_s or p.transition_bytes_per_elem):
            return 0.0
        return p.transition_overhead_s + self.batch_size * elems * p.transition_bytes_per_elem / p.mem_bw_bytes_per_s

    def _layer_cost(self, layer: LayerSpec, choice: LayerChoice) -> LayerCost:
        p = self.profile
        rule = p.rule(choice.weight, choice.activation)
        stored = choice.weight if rule is None else rule.stored
        wb = weight_bytes(layer, stored)  # moved and held as stored; counted as self.weight_counting says
        counted = {} if self.weight_counting == "with-scales" else {
            "weight_bytes": weight_bytes(layer, stored, self.weight_counting), "stored_bytes": wb}
        act = math.ceil(layer.in_elems * choice.activation.bits / 8) + layer.out_elems * 4
        b = bops(layer, choice)
        if rule is None:
            return replace(LayerCost(layer.fqn, choice, False, None, math.inf, math.inf, math.inf, wb, act, b), **counted)
        compute_s = self.batch_size * layer.macs / p.rule_macs_per_s(rule)
        moved = wb + self.batch_size * act
        memory_s = moved / p.mem_bw_bytes_per_s
        latency = max(compute_s, memory_s) + p.layer_overhead_s
        if self.measured and rule.efficiency_key in p.layer_table.layers[layer.fqn]:
            latency = p.layer_table.layers[layer.fqn][rule.efficiency_key]
        energy = None
        if rule.compute in p.energy_pj_per_mac:
            energy = self.batch_size * layer.macs * p.energy_pj_per_mac[rule.compute] * 1e-12
            if p.energy_pj_per_byte is not None:
                energy += moved * p.energy_pj_per_byte * 1e-12
        return replace(LayerCost(layer.fqn, choice, True, rule.compute, latency, compute_s, memory_s, wb, act, b, energy),
                       **counted)

    def layer_cost(self, fqn: str, choice: LayerChoice) -> LayerCost:
        cost = self._table.get((fqn, choice))
        if cost is None:  # a pair with no rule on this target: priced once, then looked up
            layer = next(x for x in self.layers if x.fqn == fqn)
            cost = self._table[(fqn, choice)] = self._layer_cost(layer, choice)
        return cost

    def upper_bounds(self, options: Mapping[str, Iterable[LayerChoice]]) -> dict[str, float]:
        """Upper bounds over every candidate that picks each layer's pair from `options` (only
        the pairs the target runs count): latency_s (each layer at its slowest pair or measured
        exit time, a conversion at every layer boundary), weight_bytes, bops, energy_j."""
        p = self.profile
        lat = wb = ops = energy = 0.0
        for layer in self.layers:
            costs = [c for c in (self.layer_cost(layer.fqn, ch) for ch in options[layer.fqn]) if c.supported]
            if not costs:
                continue
            exits = [self._exit.get((layer.fqn, c.compute), 0.0) for c in costs]
            states = [v for (f, _), v in self._state.items() if f == layer.fqn]
            lat += max(max(c.latency_s for c in costs), *exits, *states)
            wb += max(c.weight_bytes for c in costs)
            ops += max(c.bops for c in costs)
            energy += max(c.energy_j or 0.0 for c in costs)
        trans = sum(self._in_transition) + self._out_transition
        lat += trans + (p.layer_table.other_s if self.measured else 0.0)
        if p.energy_pj_per_byte is not None and p.transition_bytes_per_elem:
            n = len(self._in_transition) + 1
            energy += (trans - n * p.transition_overhead_s) * p.mem_bw_bytes_per_s * p.energy_pj_per_byte * 1e-12
        return {"latency_s": lat, "weight_bytes": wb, "bops": ops, "energy_j": energy}

    def breakdown(self, candidate: Candidate) -> list[LayerCost]:
        """Per-layer costs of a candidate, in execution order, with each layer's input transition
        (in deployed-graph mode, the conversions charged to it: Boundary.layer)."""
        costs = [self.layer_cost(x.fqn, candidate[x.fqn]) for x in self.layers]
        bounds = self.boundaries(candidate, costs)
        if bounds is not None:
            charged: dict[str, float] = {}
            for b in bounds:
                if b.layer is not None:
                    charged[b.layer] = charged.get(b.layer, 0.0) + self.boundary_s(b.kind, b.elems)
            return [replace(c, transition_s=charged.get(c.fqn, 0.0)) for c in costs]
        out = []
        prev = self.profile.io_compute
        for i, layer in enumerate(self.layers):
            c = self.layer_cost(layer.fqn, candidate[layer.fqn])
            if c.supported and c.compute != prev:
                c = replace(c, transition_s=self._in_transition[i])
            out.append(c)
            prev = c.compute if c.supported else prev
        return out

    def in_context(self, i: int, cost: LayerCost, prev: str, nxt: str | None) -> tuple[float, float, int]:
        """What layer i at `cost` adds to the latency when the layer before it computes in `prev`
        and the one after it in `nxt` (the profile's io_compute at the model's input and output):
        (seconds including its conversions, of which conversions, number of conversions).

        A measured "<prev>><own>><next>" entry is the answer when the table has one. Otherwise the
        layer's latency (its measured exit time when the next layer is of another kind, which
        includes its input conversion), plus a conversion of its input when `prev` differs and of
        the model's output after the last layer."""
        fqn = self.layers[i].fqn
        if self._state:
            measured = self._state.get((fqn, f"{prev}>{cost.compute}>{nxt}"))
            if measured is not None:
                return measured, 0.0, 0
        latency, trans_s, n = cost.latency_s, 0.0, 0
        measured_in = False
        if self._exit and i + 1 < len(self.layers) and nxt != cost.compute:
            exit_s = self._exit.get((fqn, cost.compute))
            if exit_s is not None:
                latency, measured_in = exit_s, cost.compute != prev
        if cost.compute != prev and not measured_in:
            n, trans_s = n + 1, trans_s + self._in_transition[i]
        if i + 1 == len(self.layers) and cost.compute != self.profile.io_compute:
            n, trans_s = n + 1, trans_s + self._out_transition
        return latency + trans_s, trans_s, n

    def price(self, candidate: Candidate) -> Cost:
        p = self.profile
        latency = 0.0
        wbytes = 0
        stored = 0  # held on the target (the capacity check), whatever wbytes counts
        peak_act = 0
        total_bops = 0
        energy = 0.0 if p.energy_pj_per_mac else None
        reason = ""
        n_trans = 0
        trans_s = 0.0
        prev = p.io_compute
        prev_out = 0  # output elements of the previous layer, stored at this layer's input precision
        prev_in_bytes = 0
        costs = [self.layer_cost(layer.fqn, candidate[layer.fqn]) for layer in self.layers]
        bounds = self.boundaries(candidate, costs)
        if bounds is not None:
            latency = sum(c.latency_s for c in costs)
            trans_s = sum(self.boundary_s(b.kind, b.elems) for b in bounds)
            latency += trans_s
            n_trans = len(bounds)
        for i, layer in enumerate(self.layers):
            c = costs[i]
            choice = c.choice
            if not c.supported:
                if not reason:
                    reason = (
                        f"{p.name} cannot run layer {layer.fqn} with weight {choice.weight} "
                        f"/ activation {choice.activation}"
                    )
                latency += c.latency_s
            elif bounds is None:
                nxt = costs[i + 1].compute if i + 1 < len(costs) else p.io_compute
                lat, t, n = self.in_context(i, c, prev, nxt)
                latency += lat
                trans_s += t
                n_trans += n
                prev = c.compute
            wbytes += c.weight_bytes
            stored += c.weight_bytes if c.stored_bytes is None else c.stored_bytes
            total_bops += c.bops
            if energy is not None and c.energy_j is not None:
                energy += c.energy_j
            in_bytes = math.ceil(layer.in_elems * choice.activation.bits / 8)
            if i:
                peak_act = max(peak_act, prev_in_bytes + math.ceil(prev_out * choice.activation.bits / 8))
            prev_out, prev_in_bytes = layer.out_elems, in_bytes
        if self.layers:
            peak_act = max(peak_act, prev_in_bytes + prev_out * 4)  # the model's output in fp32
        if self.measured:
            latency += p.layer_table.other_s
        if energy is not None and p.energy_pj_per_byte is not None and p.transition_bytes_per_elem:
            moved = (trans_s - n_trans * p.transition_overhead_s) * p.mem_bw_bytes_per_s
            energy += moved * p.energy_pj_per_byte * 1e-12
        peak_act *= self.batch_size
        if not reason and p.weight_capacity_bytes is not None and stored > p.weight_capacity_bytes:
            reason = f"weights need {stored:,} bytes; {p.name} holds {p.weight_capacity_bytes:,}"
        if not reason and p.act_capacity_bytes is not None and peak_act > p.act_capacity_bytes:
            reason = f"peak activations need {peak_act:,} bytes; {p.name} holds {p.act_capacity_bytes:,}"
        return Cost(
            latency_s=latency,
            weight_bytes=wbytes,
            peak_act_bytes=peak_act,
            bops=total_bops,
            energy_j=energy,
            feasible=not reason,
            reason=reason,
            transitions=n_trans,
            transition_s=trans_s,
        )
