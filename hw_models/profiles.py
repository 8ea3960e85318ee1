"""The built-in hardware profiles, every figure with its source, and the registry of targets
(get_profile: a built-in name or a profile file).

The profile types are in hw_models.profile; they are imported from here too (the old path).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

from hw_models.precision import Precision
from hw_models.profile import FIGURE_BOUNDS, ExecRule, HardwareProfile, LayerTable, bound_problem
from hw_models.profile_file import load_profile

# The profile types (FIGURE_BOUNDS ... bound_problem) live in hw_models.profile; importing them
# from here still works.
__all__ = [
    "ARM_A76",
    "BITFUSION",
    "CORTEX_M7",
    "FIGURE_BOUNDS",
    "H100",
    "JETSON_ORIN",
    "PROFILES",
    "X86_VNNI",
    "ExecRule",
    "HardwareProfile",
    "LayerTable",
    "UnknownProfileError",
    "bound_problem",
    "get_profile",
    "list_profiles",
]

P = Precision


class UnknownProfileError(LookupError):
    """A target name that is not registered."""


def _cpu_int8_rules() -> tuple[ExecRule, ...]:
    """A CPU with int8 dot-product instructions and fp32 FMA, as ONNX Runtime runs a deployed
    graph (mpsearch.deploy) on it.

    fp32 layers run fp32. Integer weights run with int8 activations on int8 kernels (QLinearConv,
    QGemm); narrower weights keep their own grid and are stored in the smallest ONNX integer
    type that holds it (int2, int3 -> INT4; int6 -> INT8), widened to int8 when the model loads:
    a memory saving only. Pairs ONNX Runtime cannot run faster or smaller than fp32 are left
    out: integer weights with fp32 activations (no weight-only convolution kernel: the weight is
    dequantized on every run, mobilenet_v2 2.2x slower than fp32 here) and fp32 weights with int8
    activations (a float convolution after a DequantizeLinear).
    """
    rules = [ExecRule(P.FP32, P.FP32, "fp32", True)]
    storage = {P.INT2: P.INT4, P.INT3: P.INT4, P.INT6: P.INT8}
    for w in (P.INT2, P.INT3, P.INT4, P.INT6, P.INT8):
        rules.append(ExecRule(w, P.INT8, "int8", w == P.INT8, storage=storage.get(w)))
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
    # fitted to deployed graphs on a VNNI CPU (see sources): mobilenet_v2, batch 1, 2 threads
    efficiency={"int8": 0.49, "fp32": 0.53},
    mem_bw_bytes_per_s=20e9,
    layer_overhead_s=1e-6,
    rules=_cpu_int8_rules(),
    threads=2,
    on_chip_bytes=2 * 1024 * 1024 + 16 * 1024 * 1024,
    transition_overhead_s=3.1e-6,
    transition_bytes_per_elem=10.0,
    quantize_bytes_per_elem=8.3,
    dequantize_bytes_per_elem=11.9,
    energy_pj_per_mac={"int8": 0.2 + 0.03, "fp32": 3.7 + 0.9},
    energy_pj_per_byte=20 * 8,
    sources={
        "on_chip_bytes": "2 cores x 1 MiB L2 (Skylake-SP / Cascade Lake) plus a 16 MiB share of L3; "
        "informative",
        "transitions": "fitted by `mpsearch calibrate --task mobilenet_v2 --threads 2` on an AMD EPYC with "
        "AVX-512 VNNI (2 cores), 2026-12-04, ONNX Runtime 1.32, to the end-to-end times of 48 deployed "
        "graphs (fp32, all-int8, alternating, 40 random mixes): a QuantizeLinear 3.1 us + 8.3 B per "
        "element, a DequantizeLinear 3.1 us + 11.9 B per element, their layout Transposes included "
        "(the chain model's transition: their mean)",
        "efficiency": "fitted by the same calibration to the per-layer kernel times of ONNX Runtime's "
        "profiler (roofline against the peaks above); mobilenet_v2 there: fp32 4.46 ms, all-int8 "
        "2.22 ms (2.0x; this profile: 4.90 and 2.19 ms)",
        "layer_overhead_s": "fitted by the same calibration: per-operator dispatch in ONNX Runtime",
        "energy_pj_per_mac": "M. Horowitz, 'Computing's energy problem', ISSCC 2014 (45 nm): 8-bit "
        "multiply 0.2 pJ + add 0.03 pJ; fp32 multiply 3.7 pJ + add 0.9 pJ (arithmetic only, no "
        "instruction or register-file overhead: a lower bound)",
        "energy_pj_per_byte": "Horowitz ISSCC 2014: DRAM 1.3-2.6 nJ per 64-bit access, ~20 pJ per bit",
        "peak_macs_per_s": "Intel 64 and IA-32 Optimization Reference Manual: AVX-512 VNNI VPDPBUSD "
        "(64 u8*s8 MACs per 512-bit instruction), 2 FMA ports on Xeon Scalable Gold/Platinum; "
        "2 cores at 2.5 GHz",
        "mem_bw_bytes_per_s": "assumed ~10 GB/s sustained per core from DRAM (STREAM-class figure "
        "for one Xeon core), 2 cores",
    },
)

def _arm_rules() -> tuple[ExecRule, ...]:
    """An Arm CPU with NEON: int8 via SDOT, fp16 FMA (ARMv8.2 FP16), fp32 FMA."""
    return (*_cpu_int8_rules(), ExecRule(P.FP16, P.FP16, "fp16", True))


# Raspberry Pi 5 class: 4 x Cortex-A76 at 2.4 GHz, 32-bit LPDDR4X-4267.
ARM_A76 = HardwareProfile(
    name="arm-a76",
    kind="cpu",
    description="Arm Cortex-A76 class mobile CPU, 4 cores at 2.4 GHz, NEON dot-product (int8 via SDOT)",
    peak_macs_per_s={
        # per core per cycle: 2 ASIMD pipes x SDOT (16 int8 MACs) / FMLA .8h (8 fp16) / .4s (4 fp32)
        "int8": 4 * 2.4e9 * 2 * 16,
        "fp16": 4 * 2.4e9 * 2 * 8,
        "fp32": 4 * 2.4e9 * 2 * 4,
    },
    efficiency={"int8": 0.35, "fp16": 0.4, "fp32": 0.5},
    mem_bw_bytes_per_s=17e9 * 0.6,
    layer_overhead_s=10e-6,
    rules=_arm_rules(),
    threads=4,
    on_chip_bytes=4 * 512 * 1024 + 2 * 1024 * 1024,
    off_chip_bytes=8 * 1024**3,
    transition_overhead_s=10e-6,
    transition_bytes_per_elem=13.0,
    sources={
        "peak_macs_per_s": "Arm Cortex-A76 Software Optimization Guide: two ASIMD pipes (V0/V1), SDOT "
        "and FMLA at throughput 2 per cycle; 4 cores at 2.4 GHz (Raspberry Pi 5, BCM2712)",
        "efficiency": "assumed (XNNPACK / Arm Compute Library reach roughly a third to a half of peak "
        "on mobile CNN layers); replace by `mpsearch calibrate` on the device",
        "mem_bw_bytes_per_s": "LPDDR4X-4267 on a 32-bit bus: 17 GB/s theoretical, ~60% sustained (assumed)",
        "layer_overhead_s": "assumed: per-operator dispatch on a mobile core, ~10 us",
        "on_chip_bytes": "Cortex-A76: 512 KiB private L2 per core; 2 MiB shared L3 (BCM2712)",
        "off_chip_bytes": "Raspberry Pi 5: 8 GB LPDDR4X",
        "transitions": "assumed as for x86-vnni: quantize / dequantize and a layout reorder per "
        "element, one dispatch",
    },
)


def _gpu_rules(fp8: bool) -> tuple[ExecRule, ...]:
    """A tensor-core GPU: int8 x int8 and (Hopper) fp8 natively, fp16 / bf16 natively, fp32 on
    CUDA cores; int4 (and narrower) weights are weight-only: dequantized to fp16 / bf16 in the
    kernel (a memory saving, compute at the fp16 / bf16 peak at the weight-only kernels' own
    efficiency, "weight_only")."""
    rules = [
        ExecRule(P.FP32, P.FP32, "fp32", True),
        ExecRule(P.FP16, P.FP16, "fp16", True),
        ExecRule(P.BF16, P.BF16, "fp16", True),
        ExecRule(P.INT8, P.INT8, "int8", True),
    ]
    if fp8:
        rules.append(ExecRule(P.FP8_E4M3, P.FP8_E4M3, "fp8", True))
    for w in (P.INT2, P.INT3, P.INT4, P.INT8):
        for a in (P.FP16, P.BF16):
            rules.append(ExecRule(w, a, "fp16", False, "weight_only"))
    for w in (P.INT2, P.INT3, P.INT4, P.INT6):
        rules.append(ExecRule(w, P.INT8, "int8", False))
    return tuple(rules)


H100 = HardwareProfile(
    name="h100",
    kind="gpu",
    description="NVIDIA H100 SXM5 80GB (dense tensor-core figures; int4 weight-only)",
    peak_macs_per_s={
        # dense: FP8 / INT8 1,979 T(FL)OPS, FP16 / BF16 989.5 TFLOPS, FP32 (CUDA cores) 66.9 TFLOPS;
        # a MAC is 2 operations. The often-quoted 3,958 TOPS is with 2:4 sparsity.
        "fp8": 1979e12 / 2,
        "int8": 1979e12 / 2,
        "fp16": 989.5e12 / 2,
        "fp32": 66.9e12 / 2,
    },
    # fitted to 522 matrix products timed on an H100 SXM5 (benchmarks/gpu_profile.py, 2026-11-28);
    # weight_only: assumed as fp16 (see sources)
    efficiency={"fp8": 0.73, "int8": 0.33, "fp16": 0.79, "fp32": 0.455, "weight_only": 0.79},
    mem_bw_bytes_per_s=3.1e12,
    layer_overhead_s=3.2e-6,
    rules=_gpu_rules(fp8=True),
    on_chip_bytes=50 * 1024 * 1024,
    off_chip_bytes=80 * 1024**3,
    transition_overhead_s=4e-6,
    transition_bytes_per_elem=6.0,
    energy_pj_per_mac={"fp8": 700 / (1979e12 / 2) * 1e12, "int8": 700 / (1979e12 / 2) * 1e12,
                       "fp16": 700 / (989.5e12 / 2) * 1e12, "fp32": 700 / (66.9e12 / 2) * 1e12},
    sources={
        "peak_macs_per_s": "NVIDIA H100 Tensor Core GPU datasheet (SXM5): FP8 1,979 TFLOPS, INT8 1,979 "
        "TOPS, BF16/FP16 989.5 TFLOPS, FP32 66.9 TFLOPS, all dense (the datasheet's 3,958 / 1,979 "
        "figures with sparsity are halved); 2 operations per MAC",
        "efficiency": "fitted to 522 matrix products timed on an NVIDIA H100 80GB HBM3 (SXM5) on "
        "2026-11-28 with PyTorch 2.11 / CUDA 13 (cuBLASLt), as CUDA-graph replays "
        "(benchmarks/gpu_profile.py; data in benchmarks/results/h100-2026-11-28.json). The "
        "8192^3 product reached fp32 51 TFLOP/s (77% of peak), bf16 803 (81%), fp8 1,352 (68%), "
        "int8 670 (34%: cuBLASLt's int8 kernels on Hopper; int8 is no faster than bf16 on large "
        "products). weight_only is assumed equal to fp16 (a Marlin / TensorRT-LLM class W4A16 "
        "kernel); PyTorch's own int4 kernel (torch._weight_int4pack_mm) measured ~30 TFLOP/s "
        "(efficiency ~0.02): 1.36x faster than bf16 at m <= 16 rows, 5-10x slower beyond. "
        "`mpsearch calibrate --target h100` fits the kernels of the machine it runs on",
        "mem_bw_bytes_per_s": "fitted to the same products (a device-to-device copy moved 2.99 TB/s, "
        "bytes read + written; datasheet: HBM3 3.35 TB/s)",
        "layer_overhead_s": "fitted to the same products: per-kernel time in a CUDA graph (eager "
        "PyTorch adds several microseconds of host dispatch per kernel)",
        "on_chip_bytes": "NVIDIA Hopper architecture whitepaper: 50 MB L2",
        "off_chip_bytes": "H100 SXM5: 80 GB HBM3",
        "transitions": "assumed: one quantize / cast kernel per conversion (read 4 + write 1-2 bytes "
        "per element), one launch",
        "energy_pj_per_mac": "upper bound from the 700 W TDP at dense peak: 700 W / MAC rate of each "
        "compute kind (datasheet); real layers use less power at lower utilisation",
    },
)

JETSON_ORIN = HardwareProfile(
    name="jetson-orin",
    kind="gpu",
    description="NVIDIA Jetson AGX Orin 64GB, Ampere GPU only (dense; no fp8; DLA not modelled)",
    peak_macs_per_s={
        # GPU: 170 sparse INT8 TOPS -> 85 dense; fp16 tensor half of int8; fp32 2048 CUDA cores
        # x 1.3 GHz x 2 ops
        "int8": 85e12 / 2,
        "fp16": 42.5e12 / 2,
        "fp32": 2048 * 1.3e9,
    },
    efficiency={"int8": 0.5, "fp16": 0.55, "fp32": 0.7, "weight_only": 0.55},
    mem_bw_bytes_per_s=204.8e9,
    layer_overhead_s=8e-6,
    rules=_gpu_rules(fp8=False),
    on_chip_bytes=4 * 1024 * 1024,
    off_chip_bytes=64 * 1024**3,
    transition_overhead_s=8e-6,
    transition_bytes_per_elem=6.0,
    energy_pj_per_mac={"int8": 60 / (85e12 / 2) * 1e12, "fp16": 60 / (42.5e12 / 2) * 1e12,
                       "fp32": 60 / (2048 * 1.3e9) * 1e12},
    energy_pj_per_byte=8 * 4.0,
    sources={
        "peak_macs_per_s": "NVIDIA Jetson AGX Orin Series datasheet: GPU 170 INT8 TOPS (sparse), i.e. "
        "85 dense; Ampere tensor cores run fp16 at half the int8 rate; 2048 CUDA cores at up to "
        "1.3 GHz for fp32",
        "efficiency": "assumed (TensorRT on small CNN layers; weight-only kernels as fp16); calibrate on "
        "the device",
        "mem_bw_bytes_per_s": "Jetson AGX Orin datasheet: 256-bit LPDDR5, 204.8 GB/s",
        "layer_overhead_s": "assumed: kernel launch on an embedded GPU, ~8 us",
        "on_chip_bytes": "Jetson AGX Orin: 4 MB GPU L2 (Ampere GA10B)",
        "off_chip_bytes": "Jetson AGX Orin 64GB: 64 GB LPDDR5 shared with the CPU",
        "transitions": "assumed: one quantize / cast kernel per conversion, one launch",
        "energy_pj_per_mac": "upper bound from the 60 W maximum module power at dense GPU peak",
        "energy_pj_per_byte": "assumed ~4 pJ per bit for LPDDR5 access",
    },
)


def _mcu_rules() -> tuple[ExecRule, ...]:
    """CMSIS-NN on a Cortex-M7: int8 x int8 kernels (operands widened to 16 bits for SMLAD);
    int4 / int2 weights unpacked to int8 (memory saving only); fp32 on the single-precision FPU;
    no fp16 / fp8 arithmetic."""
    rules = [ExecRule(P.FP32, P.FP32, "fp32", True), ExecRule(P.INT8, P.INT8, "int8", True)]
    for w in (P.INT2, P.INT3, P.INT4, P.INT6):
        rules.append(ExecRule(w, P.INT8, "int8", False))
    return tuple(rules)


CORTEX_M7 = HardwareProfile(
    name="cortex-m7",
    kind="mcu",
    description="Arm Cortex-M7 microcontroller (STM32H743: 480 MHz, 2 MB flash, 512 KB AXI SRAM), CMSIS-NN",
    peak_macs_per_s={"int8": 480e6 * 2, "fp32": 480e6 * 1},
    efficiency={"int8": 0.5, "fp32": 0.5},
    mem_bw_bytes_per_s=480e6 * 8,
    layer_overhead_s=20e-6,
    rules=_mcu_rules(),
    on_chip_bytes=512 * 1024,
    off_chip_bytes=2 * 1024 * 1024,
    weight_capacity_bytes=2 * 1024 * 1024,
    act_capacity_bytes=512 * 1024,
    transition_overhead_s=20e-6,
    transition_bytes_per_elem=16.0,
    energy_pj_per_mac={"int8": 0.5 / (480e6 * 2) * 1e12, "fp32": 0.5 / 480e6 * 1e12},
    sources={
        "peak_macs_per_s": "Arm Cortex-M7 Technical Reference Manual: SMLAD, two 16 x 16 MACs per cycle "
        "(CMSIS-NN widens int8 operands to 16 bits); single-precision VFMA one per cycle; STM32H743 "
        "at 480 MHz",
        "efficiency": "assumed: CMSIS-NN reaches about half the SMLAD peak on convolutions (operand "
        "widening and im2col)",
        "mem_bw_bytes_per_s": "64-bit AXI bus at the core clock (STM32H7 reference manual RM0433); "
        "weights read from flash through the ART accelerator are slower, not modelled",
        "layer_overhead_s": "assumed: ~10k cycles of per-layer setup in a TFLite-Micro-style interpreter",
        "on_chip_bytes": "STM32H743: 512 KB AXI SRAM (the largest contiguous RAM, for the tensor arena)",
        "off_chip_bytes": "STM32H743: 2 MB embedded flash",
        "weight_capacity_bytes": "weights must fit in the 2 MB flash",
        "act_capacity_bytes": "peak activations must fit in the 512 KB AXI SRAM tensor arena",
        "transitions": "assumed: float <-> int8 conversion of an activation in software, a few "
        "cycles per element",
        "energy_pj_per_mac": "derived: ~0.5 W for the STM32H743 at 480 MHz (datasheet run-mode current "
        "at 3.3 V, order of magnitude) divided by the MAC rate",
    },
)

BITFUSION_BRICKS = 512 * 16  # fusion units x BitBricks per unit
BITFUSION_HZ = 500e6


def _bitfusion_rules() -> tuple[ExecRule, ...]:
    """Integer weights of 2..8 bits and activations of 2..8 or 16 bits, at a throughput that
    scales with the BitBricks a MAC needs: ceil(w / 2) * ceil(a / 2) (3 bits cost what 4 bits
    do). Floats are unsupported."""
    weights = (P.INT2, P.INT3, P.INT4, P.INT6, P.INT8)
    acts = (*weights, P.INT16)
    return tuple(ExecRule(w, a, _bricks_kind(w.bits, a.bits), True) for w in weights for a in acts)


def _bricks_kind(w_bits: int, a_bits: int) -> str:
    return f"bricks{math.ceil(w_bits / 2) * math.ceil(a_bits / 2)}"


def _bitfusion_peaks() -> dict[str, float]:
    kinds = {r.compute for r in _bitfusion_rules()}
    return {k: BITFUSION_BRICKS * BITFUSION_HZ / int(k.removeprefix("bricks")) for k in kinds}


BITFUSION = HardwareProfile(
    name="bitfusion",
    kind="accel",
    description="BitFusion-style bit-flexible accelerator (512 fusion units x 16 BitBricks, 500 MHz, 45 nm)",
    peak_macs_per_s=_bitfusion_peaks(),
    efficiency={k: 0.8 for k in _bitfusion_peaks()},
    mem_bw_bytes_per_s=192 / 8 * BITFUSION_HZ,
    layer_overhead_s=2e-6,
    rules=_bitfusion_rules(),
    on_chip_bytes=112 * 1024,
    energy_pj_per_mac={k: 0.08 * int(k.removeprefix("bricks")) for k in _bitfusion_peaks()},
    energy_pj_per_byte=20 * 8,
    io_compute="bricks16",
    sources={
        "peak_macs_per_s": "H. Sharma et al., 'Bit Fusion: Bit-Level Dynamically Composable "
        "Architecture for Accelerating Deep Neural Networks', ISCA 2018: 512 Fusion Units of 16 "
        "BitBricks (2 x 2-bit multipliers) at 500 MHz; a w x a-bit MAC takes ceil(w/2) * ceil(a/2) "
        "BitBricks",
        "efficiency": "assumed: 80% PE utilisation on convolutions (systolic array with on-chip "
        "buffers)",
        "mem_bw_bytes_per_s": "assumed: the 192-bit per cycle off-chip interface of the ISCA 2018 "
        "evaluation at 500 MHz (12 GB/s)",
        "layer_overhead_s": "assumed: ~1000 cycles of per-layer configuration",
        "on_chip_bytes": "assumed: the ~112 KB of input, weight and output buffers of the ISCA 2018 "
        "configuration",
        "energy_pj_per_mac": "assumed: ~0.08 pJ per 2 x 2-bit BitBrick operation with shift-add (45 nm, "
        "from the paper's 0.9 W at 4 T brick-ops/s, order of magnitude) times the bricks a MAC needs",
        "energy_pj_per_byte": "Horowitz ISSCC 2014: DRAM ~20 pJ per bit",
    },
)

PROFILES: Mapping[str, HardwareProfile] = MappingProxyType(
    {p.name: p for p in (X86_VNNI, ARM_A76, H100, JETSON_ORIN, CORTEX_M7, BITFUSION)}
)


def get_profile(name: str) -> HardwareProfile:
    """The registered profile called `name`, or the profile file `name` when it ends in .toml
    (hw_models.profile_file); UnknownProfileError lists the known ones."""
    if name.endswith(".toml"):
        return load_profile(name)
    try:
        return PROFILES[name]
    except KeyError:
        raise UnknownProfileError(
            f"unknown target {name!r} (known: {', '.join(sorted(PROFILES))})"
        ) from None


def list_profiles() -> list[HardwareProfile]:
    return [PROFILES[k] for k in sorted(PROFILES)]
