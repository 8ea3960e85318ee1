"""Hardware profiles: typed, immutable descriptions of a target, every figure with its source."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from hw_models.precision import Precision

P = Precision


class UnknownProfileError(LookupError):
    """A target name that is not registered."""


@dataclass(frozen=True)
class ExecRule:
    """How a target runs a layer whose weights and input activations have given precisions.

    compute: the arithmetic the target actually uses ("int8", "fp32", ...), a key of the
    profile's `peak_macs_per_s`. native: False when the precision is mapped onto wider
    arithmetic (int4 weights unpacked to int8 compute: a memory saving only).
    """

    weight: Precision
    activation: Precision
    compute: str
    native: bool


@dataclass(frozen=True)
class HardwareProfile:
    """A target. Throughputs are for the whole device at the stated thread count.

    peak_macs_per_s: multiply-accumulates per second at peak for each compute kind.
    efficiency: the share of peak that real kernels reach on typical layers (fit by calibration).
    mem_bw_bytes_per_s: sustained memory bandwidth.
    layer_overhead_s: fixed cost of running one layer (dispatch, kernel launch).
    rules: the (weight, activation) pairs the target can run and how; any other pair is unsupported.
    sources: where each figure comes from, keyed by field name.
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
    _rule_index: Mapping[tuple[Precision, Precision], ExecRule] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "peak_macs_per_s", MappingProxyType(dict(self.peak_macs_per_s)))
        object.__setattr__(self, "efficiency", MappingProxyType(dict(self.efficiency)))
        object.__setattr__(self, "sources", MappingProxyType(dict(self.sources)))
        index = {(r.weight, r.activation): r for r in self.rules}
        object.__setattr__(self, "_rule_index", MappingProxyType(index))
        for r in self.rules:
            if r.compute not in self.peak_macs_per_s:
                raise ValueError(f"profile {self.name}: rule {r} uses compute {r.compute!r} with no throughput")
        for key in ("peak_macs_per_s", "mem_bw_bytes_per_s", "layer_overhead_s"):
            if key not in self.sources:
                raise ValueError(f"profile {self.name}: figure {key} has no source")

    def rule(self, weight: Precision, activation: Precision) -> ExecRule | None:
        """How this target runs the pair, or None when it cannot."""
        return self._rule_index.get((weight, activation))

    @property
    def weight_precisions(self) -> tuple[Precision, ...]:
        return tuple(sorted({r.weight for r in self.rules}, key=lambda p: (p.is_float, p.bits)))

    @property
    def activation_precisions(self) -> tuple[Precision, ...]:
        return tuple(sorted({r.activation for r in self.rules}, key=lambda p: (p.is_float, p.bits)))

    def effective_macs_per_s(self, compute: str) -> float:
        return self.peak_macs_per_s[compute] * self.efficiency.get(compute, 1.0)


def _cpu_int8_rules() -> tuple[ExecRule, ...]:
    """A CPU with int8 dot-product instructions and fp32 FMA.

    int8 weights with int8 activations run natively on int8 kernels; narrower integer
    weights (int2..int6) are stored packed and unpacked to int8 compute (memory saving only);
    integer weights with fp32 activations are dequantized and run as fp32 (weight-only);
    fp32 weights with int8 activations dequantize the input and run fp32.
    """
    rules = [ExecRule(P.FP32, P.FP32, "fp32", True), ExecRule(P.FP32, P.INT8, "fp32", False)]
    for w in (P.INT2, P.INT3, P.INT4, P.INT6, P.INT8):
        rules.append(ExecRule(w, P.INT8, "int8", w == P.INT8))
        rules.append(ExecRule(w, P.FP32, "fp32", False))
    return tuple(rules)


# Two cores of an AVX-512 VNNI server CPU (Cascade Lake / Ice Lake class, ~2.5 GHz sustained),
# the kind this project is developed and tested on.
X86_VNNI = HardwareProfile(
    name="x86-vnni",
    kind="cpu",
    description="x86 server CPU with AVX-512 VNNI, 2 cores (int8 via VPDPBUSD, fp32 via FMA)",
    peak_macs_per_s={
        # 2 cores x 2.5 GHz x 2 FMA ports x 64 int8 MACs per VPDPBUSD (512-bit)
        "int8": 2 * 2.5e9 * 2 * 64,
        # 2 cores x 2.5 GHz x 2 FMA ports x 16 fp32 lanes
        "fp32": 2 * 2.5e9 * 2 * 16,
    },
    efficiency={"int8": 0.25, "fp32": 0.5},
    mem_bw_bytes_per_s=20e9,
    layer_overhead_s=4e-6,
    rules=_cpu_int8_rules(),
    threads=2,
    sources={
        "peak_macs_per_s": "Intel 64 and IA-32 Optimization Reference Manual: AVX-512 VNNI VPDPBUSD "
        "(64 u8*s8 MACs per 512-bit instruction), 2 FMA ports on Xeon Scalable Gold/Platinum; "
        "2 cores at 2.5 GHz",
        "efficiency": "assumed (int8 kernels reach a smaller share of peak than fp32 on small layers: "
        "quantize/requantize and packing overheads); replace by `mpsearch calibrate`",
        "mem_bw_bytes_per_s": "assumed ~10 GB/s sustained per core from DRAM (STREAM-class figure "
        "for one Xeon core), 2 cores",
        "layer_overhead_s": "assumed: per-operator dispatch in ONNX Runtime / PyTorch CPU kernels, "
        "a few microseconds",
    },
)

PROFILES: Mapping[str, HardwareProfile] = MappingProxyType({p.name: p for p in (X86_VNNI,)})


def get_profile(name: str) -> HardwareProfile:
    """The registered profile called `name`; UnknownProfileError lists the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown target {name!r} (known: {', '.join(sorted(PROFILES))})"
        ) from None


def list_profiles() -> list[HardwareProfile]:
    return [PROFILES[k] for k in sorted(PROFILES)]
