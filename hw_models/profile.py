"""Hardware profile types: typed, immutable descriptions of a target, every figure with its source.

The built-in profiles and the registry are in hw_models.profiles; profile files in
hw_models.profile_file. Both build on the types here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from hw_models.precision import Precision

# Physical bounds of a profile's figures, inclusive: (low, high, unit). Every built-in profile and
# every profile `mpsearch calibrate` fits lies well inside them; a figure outside is a unit slip
# (GB/s written as B/s) or a number that breaks the arithmetic (1e308 overflows a sum of latencies,
# 1e-300 makes them infinite). Checked where a profile file is loaded (hw_models.profile_file) and
# by HardwareProfile.check_bounds; a profile built in code is only required to be finite (the
# calibration's own design matrices use a 1 B/s bandwidth and 1 s conversions as unit columns).
#   peak_macs_per_s: a microcontroller at 1 MHz to an exa-MAC/s device (an H100 is ~1e15)
#   efficiency: share of peak; the calibration's fitting grid starts at 0.002
#   mem_bw_bytes_per_s: a slow serial bus (kB/s) to 1 PB/s (HBM3 is ~3e12)
#   *_overhead_s: a dispatch or kernel launch takes microseconds; 10 s is far beyond any
#   *_bytes_per_elem: bytes a conversion moves per element (~2-20)
#   energy_pj_per_mac / energy_pj_per_byte: ~0.1-1000 pJ in practice
#   *_bytes capacities, threads: at least one; at most an exabyte, a million threads
#   layer_table: MACs per sample, measured seconds per layer (other_s included)
FIGURE_BOUNDS: Mapping[str, tuple[float, float, str]] = MappingProxyType({
    "peak_macs_per_s": (1e3, 1e18, "MAC/s"),
    "efficiency": (1e-4, 1.0, ""),
    "mem_bw_bytes_per_s": (1e3, 1e15, "B/s"),
    "layer_overhead_s": (0.0, 10.0, "s"),
    "transition_overhead_s": (0.0, 10.0, "s"),
    "transition_bytes_per_elem": (0.0, 1e4, "B"),
    "quantize_bytes_per_elem": (0.0, 1e4, "B"),
    "dequantize_bytes_per_elem": (0.0, 1e4, "B"),
    "energy_pj_per_mac": (0.0, 1e6, "pJ"),
    "energy_pj_per_byte": (0.0, 1e6, "pJ"),
    "threads": (1, 1e6, ""),
    "on_chip_bytes": (1, 1e18, "B"),
    "off_chip_bytes": (1, 1e18, "B"),
    "weight_capacity_bytes": (1, 1e18, "B"),
    "act_capacity_bytes": (1, 1e18, "B"),
    "layer_table.macs": (0.0, 1e18, ""),
    "layer_table.seconds": (0.0, 1e3, "s"),
})


def _bound_text(v: float) -> str:
    """1e3, 1e-4, 10, 0: how FIGURE_BOUNDS are written in messages and docs."""
    if v == int(v) and 0 <= v <= 100:
        return str(int(v))
    mantissa, exp = f"{v:e}".split("e")
    return f"{float(mantissa):g}e{int(exp)}"


def bound_problem(field_name: str, value: float, bounds: str | None = None) -> str | None:
    """None when `value` is within FIGURE_BOUNDS[bounds or field_name]; else the one-line reason,
    "field <field_name>: <value> is outside the allowed range [low, high] <unit>"."""
    lo, hi, unit = FIGURE_BOUNDS[bounds or field_name]
    if lo <= value <= hi:
        return None
    return f"field {field_name}: {value!r} is outside the allowed range [{_bound_text(lo)}, {_bound_text(hi)}]" + (
        f" {unit}" if unit else "")


@dataclass(frozen=True)
class ExecRule:
    """How a target runs a layer whose weights and input activations have given precisions.

    compute: the arithmetic the target actually uses ("int8", "fp32", ...), a key of the
    profile's `peak_macs_per_s`. native: False when the precision is mapped onto wider
    arithmetic (int4 weights unpacked to int8 compute: a memory saving only).
    kernel: the kernel family whose efficiency applies, when it is not the compute kind's own
    (a GPU's weight-only kernels dequantize in the inner loop and reach a share of the fp16
    peak of their own: "weight_only"); a key of the profile's `efficiency`, or "" for compute.
    storage: the format the deployed model keeps the weight in, when it is not the weight's own
    (ONNX Runtime stores int2 / int3 weights as INT4 and int6 weights as INT8); None: the
    weight's precision. Weight memory and weight traffic are priced at the storage's bits.
    """

    weight: Precision
    activation: Precision
    compute: str
    native: bool
    kernel: str = ""
    storage: Precision | None = None

    @property
    def stored(self) -> Precision:
        return self.storage or self.weight

    @property
    def efficiency_key(self) -> str:
        return self.kernel or self.compute


@dataclass(frozen=True)
class LayerTable:
    """Measured per-layer latencies of one model on the target (lookup-table mode).

    layers: fqn -> {"macs": the layer's MACs per sample (to recognise it), compute kind (or a
    rule's kernel, e.g. "weight_only") -> seconds at batch_size, and optionally "<compute kind>@exit" -> seconds when the next layer
    uses another compute kind (a runtime may then run the layer differently) and
    "<prev>><own>><next>" -> seconds of the layer between layers of those compute kinds, its
    conversions included}. other_s: the model's operations that are not quantizable layers
    (pooling, additions, reshapes). A cost model uses the table when every one of its layers
    is in it with the same MACs and its batch size is batch_size; otherwise the roofline.
    """

    layers: Mapping[str, Mapping[str, float]]
    batch_size: int = 1
    other_s: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", MappingProxyType({k: MappingProxyType(dict(v)) for k, v in self.layers.items()}))


@dataclass(frozen=True)
class HardwareProfile:
    """A target. Throughputs are for the whole device at the stated thread count.

    peak_macs_per_s: multiply-accumulates per second at peak for each compute kind.
    efficiency: the share of peak that real kernels reach on typical layers (fit by calibration).
    mem_bw_bytes_per_s: sustained off-chip memory bandwidth.
    layer_overhead_s: fixed cost of running one layer (dispatch, kernel launch).
    rules: the (weight, activation) pairs the target can run and how; any other pair is unsupported.
    sources: where each figure comes from, keyed by field name.
    threads: the thread count the figures are for (CPUs).
    on_chip_bytes / off_chip_bytes: cache or SRAM, and DRAM or flash capacity (informative).
    weight_capacity_bytes / act_capacity_bytes: hard limits: a configuration whose weights, or
        whose peak activation memory, do not fit is infeasible (a microcontroller's flash and
        SRAM). None: no limit.
    energy_pj_per_mac: energy of one multiply-accumulate per compute kind (picojoules).
    energy_pj_per_byte: energy of moving one byte to or from off-chip memory.
    transition_overhead_s / transition_bytes_per_elem: converting an activation between compute
        kinds (int8 <-> fp32: quantize / dequantize, and on CPUs the layout change between int8
        and fp32 kernels) costs one extra operation plus this many bytes moved per element.
    quantize_bytes_per_elem / dequantize_bytes_per_elem: where the cost model prices the deployed
        graph's own boundaries (hw_models.graph), a QuantizeLinear and a DequantizeLinear each cost
        transition_overhead_s plus this many bytes moved per element (their layout change
        included); None: transition_bytes_per_elem.
    io_compute: the compute kind the model's input arrives in and its output leaves in.
    layer_table: measured per-layer latencies of one model (written by `mpsearch calibrate`).
    """

    name: str
    kind: str
    description: str
    peak_macs_per_s: Mapping[str, float]
    efficiency: Mapping[str, float]
    mem_bw_bytes_per_s: float
    layer_overhead_s: float
    rules: tuple[ExecRule, ...]
    sources: Mapping[str, str]
    threads: int | None = None
    on_chip_bytes: int | None = None
    off_chip_bytes: int | None = None
    weight_capacity_bytes: int | None = None
    act_capacity_bytes: int | None = None
    energy_pj_per_mac: Mapping[str, float] = field(default_factory=dict)
    energy_pj_per_byte: float | None = None
    transition_overhead_s: float = 0.0
    transition_bytes_per_elem: float = 0.0
    quantize_bytes_per_elem: float | None = None
    dequantize_bytes_per_elem: float | None = None
    io_compute: str = "fp32"
    layer_table: LayerTable | None = None
    _rule_index: Mapping[tuple[Precision, Precision], ExecRule] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for key, v in self._figures():
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"profile {self.name}: {key} must be finite, got {v}")
        for key in ("peak_macs_per_s", "efficiency", "sources", "energy_pj_per_mac"):
            object.__setattr__(self, key, MappingProxyType(dict(getattr(self, key))))
        object.__setattr__(self, "rules", tuple(self.rules))
        index = {(r.weight, r.activation): r for r in self.rules}
        object.__setattr__(self, "_rule_index", MappingProxyType(index))
        if not self.rules:
            raise ValueError(f"profile {self.name}: no rules (nothing can run)")
        for r in self.rules:
            if r.compute not in self.peak_macs_per_s:
                raise ValueError(f"profile {self.name}: rule {r} uses compute {r.compute!r} with no throughput")
        for k, v in self.peak_macs_per_s.items():
            if not v > 0:
                raise ValueError(f"profile {self.name}: peak_macs_per_s[{k!r}] must be positive, got {v}")
        for k, v in self.efficiency.items():
            if not 0 < v <= 1:
                raise ValueError(f"profile {self.name}: efficiency[{k!r}] must be in (0, 1], got {v}")
        if not self.mem_bw_bytes_per_s > 0:
            raise ValueError(f"profile {self.name}: mem_bw_bytes_per_s must be positive")
        for key in ("layer_overhead_s", "transition_overhead_s", "transition_bytes_per_elem",
                    "quantize_bytes_per_elem", "dequantize_bytes_per_elem"):
            if getattr(self, key) is not None and not getattr(self, key) >= 0:
                raise ValueError(f"profile {self.name}: {key} must be >= 0, got {getattr(self, key)}")
        required = ["peak_macs_per_s", "efficiency", "mem_bw_bytes_per_s", "layer_overhead_s"]
        optional = ("on_chip_bytes", "off_chip_bytes", "weight_capacity_bytes", "act_capacity_bytes",
                    "energy_pj_per_byte")
        required += [k for k in optional if getattr(self, k) is not None]
        required += ["energy_pj_per_mac"] if self.energy_pj_per_mac else []
        required += ["transitions"] if self.transition_overhead_s or self.transition_bytes_per_elem else []
        for key in required:
            if not self.sources.get(key):
                raise ValueError(f"profile {self.name}: figure {key} has no source")

    def _figures(self) -> list[tuple[str, float]]:
        """(field as a profile file names it, value) of every number the profile holds."""
        out: list[tuple[str, float]] = []
        for key in ("peak_macs_per_s", "efficiency", "energy_pj_per_mac"):
            out += [(f"{key}.{k}", v) for k, v in getattr(self, key).items()]
        for key in ("mem_bw_bytes_per_s", "layer_overhead_s", "transition_overhead_s", "transition_bytes_per_elem",
                    "quantize_bytes_per_elem", "dequantize_bytes_per_elem", "energy_pj_per_byte", "threads",
                    "on_chip_bytes", "off_chip_bytes", "weight_capacity_bytes", "act_capacity_bytes"):
            if getattr(self, key) is not None:
                out.append((key, getattr(self, key)))
        t = self.layer_table
        if t is not None:
            out += [(f"layer_table.layers.{fqn}.{k}", v) for fqn, e in t.layers.items() for k, v in e.items()]
            out.append(("layer_table.other_s", t.other_s))
        return out

    def bound_problems(self) -> list[str]:
        """One line per figure outside its physical bounds (FIGURE_BOUNDS); [] when all are in."""
        out = []
        for name, v in self._figures():
            group = name.split(".", 1)[0]
            if group == "layer_table":
                group = "layer_table.macs" if name.endswith(".macs") else "layer_table.seconds"
            problem = bound_problem(name, v, group)
            if problem:
                out.append(problem)
        return out

    def check_bounds(self) -> None:
        """Raise ValueError naming the first figure outside its physical bounds (FIGURE_BOUNDS):
        "field <name>: <value> is outside the allowed range [low, high] <unit>"."""
        problems = self.bound_problems()
        if problems:
            raise ValueError(problems[0])

    def rule(self, weight: Precision, activation: Precision) -> ExecRule | None:
        """How this target runs the pair, or None when it cannot."""
        return self._rule_index.get((weight, activation))

    @property
    def weight_precisions(self) -> tuple[Precision, ...]:
        return tuple(sorted({r.weight for r in self.rules}, key=_precision_order))

    @property
    def default_weight_precisions(self) -> tuple[Precision, ...]:
        """The weight precisions a search considers by default: every one the target runs, less
        those it runs and stores exactly as a wider integer precision (same compute kind and
        storage with every activation: the same cost, less accuracy; int2 / int3 next to int4 on
        a CPU that stores them as INT4)."""

        def runs(w: Precision) -> dict[Precision, tuple[str, str, Precision]]:
            return {r.activation: (r.compute, r.kernel, r.stored) for r in self.rules if r.weight == w}

        out = []
        for w in self.weight_precisions:
            same = [v for v in self.weight_precisions if v.is_int and w.is_int and v.bits > w.bits and runs(v) == runs(w)]
            if not same:
                out.append(w)
        return tuple(out)

    @property
    def activation_precisions(self) -> tuple[Precision, ...]:
        return tuple(sorted({r.activation for r in self.rules}, key=_precision_order))

    def effective_macs_per_s(self, compute: str) -> float:
        return self.peak_macs_per_s[compute] * self.efficiency.get(compute, 1.0)

    def rule_macs_per_s(self, rule: ExecRule) -> float:
        """The rule's compute peak at its kernel's efficiency (the compute kind's when the
        profile has none for the kernel)."""
        eff = self.efficiency.get(rule.efficiency_key, self.efficiency.get(rule.compute, 1.0))
        return self.peak_macs_per_s[rule.compute] * eff


def _precision_order(p: Precision) -> tuple[bool, int, str]:
    """Integers before floats, narrower first, then by name (bf16 before fp16): a fixed order, so
    a space's choices (and a seeded search's proposals) are the same in every process."""
    return (p.is_float, p.bits, p.value)
