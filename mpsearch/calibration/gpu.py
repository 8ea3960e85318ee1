"""`mpsearch calibrate` on a GPU profile: time matrix products on a CUDA GPU and fit the profile.

What is measured (PyTorch on the GPU; `measure_gemms`):

* matrix products out[m, n] = a[m, k] @ w[n, k]^T, one library kernel each, per kind:
  fp32 (CUDA cores: TF32 off), bf16 (tensor cores, bf16 out), fp8 (e4m3 x e4m3 with per-tensor
  scales, bf16 out: `torch._scaled_mm`), int8 (int8 x int8, int32 out: `torch._int_mm`) and int4w
  (int4 weights, group-wise scales, bf16 activations: the weight-only kernel
  `torch._weight_int4pack_mm`). The shapes: the model's layers lowered to GEMMs (`layer_gemms`:
  m = batch x output positions, k = input channels x kernel size, n = output channels; grouped
  and depthwise convolutions are not matrix products and are left out) and a sweep from
  launch-bound (m = 1) to compute-bound (8192 x 8192 x 8192) (`gemm_sweep`);
* each product is timed as the replay of a CUDA graph of many back-to-back calls (what a
  deployed engine launches; eager PyTorch adds ~5-10 us of host dispatch per call), with CUDA
  events, median over rounds; operands rotate through enough copies to exceed twice the L2
  cache, so that weights are read from memory as in a real network;
* each kind is first checked against an fp32 reference on the same operands (int8 exactly);
  a kind that fails is reported and not timed;
* the memory bandwidth: a large device-to-device copy, bytes read plus written.

What is fitted (`mpsearch.calibration.fit.fit_roofline`, as for CPUs): the profile's efficiency per compute
kind (bf16 products fit "fp16"), the weight-only kernels' own efficiency ("weight_only": int4
weights run at the fp16 peak times it), one per-layer overhead and the memory bandwidth the
products reach (between half and twice the measured copy bandwidth). With a task, the task's own
products also become the profile's lookup table (`mpsearch.calibration.cpu`). `GpuCalibration.validation`
scores the profile as given (uncalibrated), a fit on half the products (predicting the other half) and the
final fit against the measurements.

Shapes a kernel does not take are not timed: int8 needs m > 16 (torch._int_mm), int4w a k
divisible by 32; grouped and depthwise convolutions are not matrix products.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from tqdm import tqdm

from hw_models import CostModel, HardwareProfile, LayerChoice, LayerSpec, Precision
from hw_models.profile import LayerTable
from mpsearch.calibration.fit import fidelity, fit_roofline
from mpsearch.errors import InvalidConfigError

P = Precision
# The products measured: kind -> the (weight, activation) pair the profile prices them as.
KINDS: dict[str, tuple[Precision, Precision]] = {
    "fp32": (P.FP32, P.FP32),
    "bf16": (P.BF16, P.BF16),
    "fp8": (P.FP8_E4M3, P.FP8_E4M3),
    "int8": (P.INT8, P.INT8),
    "int4w": (P.INT4, P.BF16),
}
ALIGN = 16  # fp8 kernels take k and n in multiples of 16 (int8: 8); m is left as it is
OVERHEAD_GRID = np.linspace(0.0, 20e-6, 201)
BANDWIDTH_SCALES = np.geomspace(0.5, 2.0, 41)  # fitted bandwidth / measured copy bandwidth
GRAPH_S = 2e-3  # each timed graph replay lasts about this long
ROTATE_BYTES_OVER_L2 = 2  # operands of the rotated copies add up to this many L2 caches


@dataclass(frozen=True)
class Gemm:
    """out[m, n] = a[m, k] @ w[n, k]^T: a linear layer of k inputs and n outputs at m rows."""

    name: str
    m: int
    k: int
    n: int

    def spec(self) -> LayerSpec:
        """The product as the cost model sees it: a linear layer priced at batch size m."""
        return LayerSpec(self.name, "linear", (self.n, self.k), 1, self.k * self.n, self.k, self.n)

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def _pad(x: int, to: int = ALIGN) -> int:
    return -(-x // to) * to


def layer_gemms(layers: Iterable[LayerSpec], batch_size: int) -> list[Gemm]:
    """The layers that are matrix products (linear layers, convolutions with groups = 1), lowered
    to GEMMs at `batch_size`, k and n padded to multiples of 16."""
    out = []
    for x in layers:
        if x.groups != 1:
            continue
        n = x.out_channels
        k = x.weight_elems // n
        m = batch_size * x.out_elems // n
        out.append(Gemm(f"{x.fqn}@b{batch_size}", m, _pad(k), _pad(n)))
    return out


def layer_table(layers: Iterable[LayerSpec], profile: HardwareProfile, measured: Iterable[Measurement],
                batch_size: int) -> LayerTable:
    """The layers' measured products (`layer_gemms` names) as a lookup table: per layer, the
    seconds of each kind under the key its rule prices it by (bf16 -> "fp16", int4w ->
    "weight_only"). Layers that are no matrix product hold only their MACs (the cost model
    prices them by the roofline); the network's other operations are not measured (other_s 0)."""
    seconds = {(m.gemm.name, m.kind): m.seconds for m in measured}
    entries = {}
    for layer in layers:
        e = {"macs": float(layer.macs)}
        for kind, pair in KINDS.items():
            rule = profile.rule(*pair)
            t = seconds.get((f"{layer.fqn}@b{batch_size}", kind))
            if rule is not None and t is not None:
                e[rule.efficiency_key] = t
        entries[layer.fqn] = e
    return LayerTable(entries, batch_size, 0.0)


def gemm_sweep(quick: bool = False) -> list[Gemm]:
    """Transformer-style products from launch-bound to compute-bound."""
    shapes = [(768, 768), (768, 3072), (4096, 4096), (4096, 14336), (14336, 4096)]
    ms = (1, 32, 512, 4096) if quick else (1, 16, 32, 128, 512, 2048, 8192)
    out = [Gemm(f"k{k}n{n}m{m}", m, k, n) for k, n in shapes for m in ms]
    return [*out, Gemm("peak", 8192, 8192, 8192)]


# ---------------------------------------------------------------------------------------------
# The kernels


def _int4_layout(k: int) -> tuple[int, int] | None:
    """(group size, inner k tiles) of the int4 weight-only kernel for this k, or None."""
    group = next((g for g in (128, 64, 32) if k % g == 0), None)
    tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)
    return None if group is None or tiles is None else (group, tiles)


def supports(kind: str, g: Gemm, device: str) -> bool:
    """Whether the kind's kernel takes the product's shape (torch._int_mm: m > 16)."""
    if kind == "int4w":
        return device == "cuda" and _int4_layout(g.k) is not None and g.n % 8 == 0
    if kind == "int8":
        return g.m > 16
    return True


class _Product:
    """Operands of one product of one kind on a device, and the call that computes it."""

    def __init__(self, kind: str, g: Gemm, device: str, gen: torch.Generator):
        self.kind = kind

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device)

        if kind in ("fp32", "bf16"):
            dt = torch.float32 if kind == "fp32" else torch.bfloat16
            self.a, self.w = randn(g.m, g.k).to(dt), randn(g.n, g.k).to(dt)
            self.call = lambda: torch.matmul(self.a, self.w.t())
        elif kind == "int8":
            self.a = torch.randint(-128, 128, (g.m, g.k), generator=gen, device=device, dtype=torch.int8)
            self.w = torch.randint(-128, 128, (g.n, g.k), generator=gen, device=device, dtype=torch.int8)
            self.call = lambda: torch._int_mm(self.a, self.w.t())
        elif kind == "fp8":
            f8 = torch.float8_e4m3fn
            self.a, self.w = randn(g.m, g.k).to(f8), randn(g.n, g.k).to(f8)
            self.sa = torch.tensor(1.0, device=device)
            self.sw = torch.tensor(1.0, device=device)
            self.call = lambda: torch._scaled_mm(self.a, self.w.t(), self.sa, self.sw, out_dtype=torch.bfloat16)
        elif kind == "int4w":
            group, tiles = _int4_layout(g.k)
            self.group = group
            self.q = torch.randint(0, 16, (g.n, g.k), generator=gen, device=device, dtype=torch.uint8)
            packed = (self.q[:, ::2] << 4 | self.q[:, 1::2]).contiguous()
            self.w = torch._convert_weight_to_int4pack(packed, tiles)
            self.scale_zero = (torch.rand(g.k // group, g.n, 2, generator=gen, device=device) * 0.02).to(torch.bfloat16)
            self.a = randn(g.m, g.k).to(torch.bfloat16)
            self.call = lambda: torch._weight_int4pack_mm(self.a, self.w, self.group, self.scale_zero)
        else:
            raise InvalidConfigError(f"unknown product kind {kind!r} (known: {', '.join(KINDS)})")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.a, self.w))

    def references(self) -> list[torch.Tensor]:
        """The exact result(s) in fp32 (int4w: the two usual nibble orders x zero-point offsets)."""
        if self.kind != "int4w":
            return [self.a.float() @ self.w.float().t()]
        a = self.a.float()
        s = self.scale_zero[..., 0].float().repeat_interleave(self.group, 0)  # [k, n]
        z = self.scale_zero[..., 1].float().repeat_interleave(self.group, 0)
        out = []
        for q in (self.q, self._swapped_nibbles()):
            for offset in (8, 0):
                out.append(a @ ((q.float().t() - offset) * s + z))
        return out

    def _swapped_nibbles(self) -> torch.Tensor:
        q = self.q.clone()
        q[:, ::2], q[:, 1::2] = self.q[:, 1::2], self.q[:, ::2]
        return q


# Relative error ||out - ref|| / ||ref|| a correct kernel stays under (bf16 / fp8 outputs are
# rounded to bf16; fp32 with TF32 off is exact to float rounding; int8 is exact).
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2, "fp8": 2e-2, "int8": 0.0, "int4w": 2e-2}


def check_kind(kind: str, device: str, seed: int = 0) -> str:
    """'' when the kind's kernel computes the right product on this device, else the reason."""
    g = Gemm("check", 64, 256, 128)
    if not supports(kind, g, device):
        return f"no {kind} kernel on {device}"
    gen = torch.Generator(device=device).manual_seed(seed)
    try:
        prod = _Product(kind, g, device, gen)
        out = prod.call().float()
    except (RuntimeError, NotImplementedError, TypeError, AttributeError) as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    errs = [float((out - r).norm() / r.norm()) for r in prod.references()]
    if min(errs) <= TOLERANCE[kind]:
        return ""
    return f"wrong result: relative error {min(errs):.3g} > {TOLERANCE[kind]:g}"


# ---------------------------------------------------------------------------------------------
# Timing


def _time_cuda(calls: Sequence[Callable[[], object]], rounds: int) -> tuple[float, str]:
    """Seconds per call: a CUDA graph of back-to-back calls (cycling through `calls`), replayed
    `rounds` times between CUDA events; the median. Eager launches when capture fails."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for c in calls:  # warm-up: library plans and workspaces are made outside the capture
            c()
    torch.cuda.current_stream().wait_stream(side)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for c in calls:
        c()
    end.record()
    end.synchronize()
    estimate = start.elapsed_time(end) / 1e3 / len(calls)
    reps = len(calls) * max(1, min(256, math.ceil(GRAPH_S / max(estimate, 1e-7) / len(calls))))
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(reps):
                calls[i % len(calls)]()
        run, mode = graph.replay, "graph"
        run()
    except RuntimeError:
        torch.cuda.synchronize()

        def run():
            for i in range(reps):
                calls[i % len(calls)]()
        mode = "eager"
    times = []
    for _ in range(rounds):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    return statistics.median(times), mode


def _time_cpu(calls: Sequence[Callable[[], object]], rounds: int) -> tuple[float, str]:
    for c in calls:
        c()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for c in calls:
            c()
        times.append((time.perf_counter() - t0) / len(calls))
    return statistics.median(times), "cpu"


def copy_bandwidth(device: str, sizes: Sequence[int] = (1 << 28, 1 << 30, 1 << 32), rounds: int = 10) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written: the best
    over copies of `sizes` bytes."""
    timer = _time_cuda if device == "cuda" else _time_cpu
    best = 0.0
    for nbytes in sizes:
        x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        y = torch.empty_like(x)
        seconds, _ = timer([lambda x=x, y=y: y.copy_(x)], rounds)
        best = max(best, 2 * nbytes / seconds)
        del x, y
    return best


@dataclass(frozen=True)
class Measurement:
    gemm: Gemm
    kind: str
    seconds: float
    mode: str  # "graph" (CUDA graph replay), "eager" or "cpu"

    @property
    def tflops(self) -> float:
        return self.gemm.flops / self.seconds / 1e12


def measure_gemms(gemms: Sequence[Gemm], kinds: Sequence[str], device: str = "cuda", *, rounds: int = 10,
                  seed: int = 0, progress: bool = True) -> tuple[list[Measurement], list[str]]:
    """Time each product in each kind (module doc); kinds a device cannot run are skipped.
    Returns the measurements and, for each product the library refused (a kernel's launch
    limits, say), one line naming it and the error."""
    if device == "cuda":
        l2 = torch.cuda.get_device_properties(0).L2_cache_size
        timer = _time_cuda
    else:
        l2, timer = 32 << 20, _time_cpu
    gen = torch.Generator(device=device).manual_seed(seed)
    out, failed = [], []
    todo = [(g, k) for g in gemms for k in kinds if supports(k, g, device)]
    for g, kind in tqdm(todo, desc="timing products", unit="product", file=sys.stderr, disable=not progress):
        try:
            first = _Product(kind, g, device, gen)
            copies = max(2, min(16, math.ceil(ROTATE_BYTES_OVER_L2 * l2 / max(first.nbytes, 1))))
            prods = [first] + [_Product(kind, g, device, gen) for _ in range(copies - 1)]
            seconds, mode = timer([p.call for p in prods], rounds)
        except RuntimeError as e:  # torch.AcceleratorError too
            failed.append(f"{kind} {g.m}x{g.k}x{g.n} ({g.name}): {str(e).splitlines()[0]}")
            if device == "cuda":
                torch.cuda.synchronize()
            continue
        finally:
            prods = first = None
        out.append(Measurement(g, kind, seconds, mode))
    return out, failed


# ---------------------------------------------------------------------------------------------
# Fitting and validation


def predict(profile: HardwareProfile, m: Measurement) -> float:
    """The profile's latency for the product (seconds)."""
    w, a = KINDS[m.kind]
    return CostModel([m.gemm.spec()], profile, m.gemm.m).layer_cost(m.gemm.name, LayerChoice(w, a)).latency_s


def fit_profile(base: HardwareProfile, measured: Sequence[Measurement], bandwidth: float
                ) -> tuple[dict[str, float], float, float, float]:
    """(efficiency per compute kind, per-layer overhead, memory bandwidth, rms log error) fitted
    to the native kinds' products; the bandwidth is searched over BANDWIDTH_SCALES x `bandwidth`
    (the measured copy bandwidth: matrix-product kernels stream their operands at a rate of
    their own)."""
    at_peak = replace(base, efficiency={}, mem_bw_bytes_per_s=bandwidth, layer_table=None)
    rows: dict[str, list[tuple[float, float, float]]] = {}
    for m in measured:
        rule = base.rule(*KINDS[m.kind])
        if rule is None or not (rule.native or rule.kernel):  # a mapped kind without a kernel of its own
            continue
        c = CostModel([m.gemm.spec()], at_peak, m.gemm.m).layer_cost(m.gemm.name, LayerChoice(*KINDS[m.kind]))
        rows.setdefault(rule.efficiency_key, []).append((c.compute_s, c.memory_s, m.seconds))
    if not rows:
        raise InvalidConfigError("no product of a kind the profile runs natively was timed; nothing to fit")
    best = (math.inf, {}, 0.0, bandwidth)
    for scale in BANDWIDTH_SCALES:
        scaled = {k: np.array(v) / [1.0, scale, 1.0] for k, v in rows.items()}
        eff, overhead, rms = fit_roofline(scaled, OVERHEAD_GRID)
        if rms < best[0]:
            best = (rms, eff, overhead, bandwidth * float(scale))
    rms, eff, overhead, bw = best
    return eff, overhead, bw, rms


@dataclass
class GpuCalibration:
    """A fitted GPU profile, the measurements behind it, and how well profiles predict them."""

    profile: HardwareProfile
    base: HardwareProfile
    device_name: str
    copy_bandwidth: float  # measured (bytes read + written per second)
    measurements: list[Measurement]
    checks: dict[str, str]  # kind -> '' or why it was not timed
    failed: list[str] = field(default_factory=list)  # products the library refused
    fit: dict[str, float] = field(default_factory=dict)

    def validation(self) -> dict:
        """Fidelity of the profile as given (uncalibrated) on every product, of a profile fitted on the even
        products on the odd ones (held out), and of the final fit on every product; per kind and
        over the native kinds together."""
        ms = self.measurements
        order = {g: i for i, g in enumerate(dict.fromkeys(m.gemm for m in ms))}
        train = [m for m in ms if order[m.gemm] % 2 == 0]
        test = [m for m in ms if order[m.gemm] % 2 == 1]
        eff, over, bw, _ = fit_profile(self.base, train, self.copy_bandwidth)
        half = replace(self.base, mem_bw_bytes_per_s=bw, efficiency={**self.base.efficiency, **eff},
                       layer_overhead_s=over)
        out: dict = {}
        for key, prof, sel in (("uncalibrated", self.base, ms), ("held_out", half, test),
                               ("calibrated", self.profile, ms)):
            native = [m for m in sel if self.base.rule(*KINDS[m.kind]).native]
            groups = {"native": native, **{k: [m for m in sel if m.kind == k] for k in KINDS}}
            out[key] = {g: fidelity([predict(prof, m) for m in v], [m.seconds for m in v]) | {"n": len(v)}
                        for g, v in groups.items() if len(v) >= 2}
        return out

    def speedups(self) -> list[dict]:
        """Per product timed in bf16 and in another kind: measured and predicted bf16 / kind."""
        by = {(m.gemm, m.kind): m for m in self.measurements}
        out = []
        for (g, kind), m in by.items():
            ref = by.get((g, "bf16"))
            if kind == "bf16" or ref is None:
                continue
            out.append({"gemm": g.name, "m": g.m, "k": g.k, "n": g.n, "kind": kind,
                        "measured": ref.seconds / m.seconds,
                        "uncalibrated": predict(self.base, ref) / predict(self.base, m),
                        "calibrated": predict(self.profile, ref) / predict(self.profile, m)})
        return out

    def summary(self) -> str:
        p = self.profile
        eff = ", ".join(f"{k} {v:.3g}" for k, v in p.efficiency.items())
        lines = [(f"{self.device_name}: copy bandwidth {self.copy_bandwidth / 1e12:.3g} TB/s; fitted "
                  f"{p.mem_bw_bytes_per_s / 1e12:.3g} (uncalibrated {self.base.mem_bw_bytes_per_s / 1e12:.3g})")]
        for kind, why in self.checks.items():
            if why:
                lines.append(f"  {kind}: not timed ({why})")
        peak = [m for m in self.measurements if m.gemm.name == "peak"]
        for m in peak:
            rule = self.base.rule(*KINDS[m.kind])
            sheet = 2 * self.base.peak_macs_per_s[rule.compute] / 1e12
            lines.append(f"  {m.kind:6s} 8192^3: {m.tflops:7.1f} TFLOP/s = {m.tflops / sheet:.0%} of the "
                         f"datasheet's {sheet:.4g} (compute {rule.compute})")
        lines.append(f"profile {p.name}: efficiency {eff}; overhead {p.layer_overhead_s * 1e6:.3g} us/layer; "
                     f"fit rms log error {self.fit.get('rms_log', float('nan')):.3f} on {len(self.measurements)} products")
        for f in self.failed:
            lines.append(f"  not timed: {f}")
        if p.layer_table is not None:
            timed = sum(len(e) - 1 for e in p.layer_table.layers.values())
            lines.append(f"lookup table: {timed} measured latencies of {len(p.layer_table.layers)} layers at batch "
                         f"{p.layer_table.batch_size} (layers that are no matrix product keep the roofline)")
        lines.append(f"{'predicting':12s} {'products':>9s} {'spearman':>9s} {'MAPE %':>8s} {'within 10%':>11s}")
        for key, groups in self.validation().items():
            for g, s in groups.items():
                lines.append(f"{key + ' ' + g:20s} {s['n']:5d} {s['spearman']:9.3f} {s['mape']:8.1f} "
                             f"{s['within_10pct']:11.0%}")
        return "\n".join(lines)


def software() -> str:
    """The PyTorch and CUDA versions that ran the kernels (kernel speed depends on both)."""
    return f"PyTorch {torch.__version__}, CUDA {torch.version.cuda or 'none'}"


def calibrate_gpu(base: HardwareProfile, gemms: Sequence[Gemm], *, name: str | None = None, device: str = "cuda",
                  kinds: Sequence[str] = tuple(KINDS), rounds: int = 10, seed: int = 0, progress: bool = True,
                  context: str = "") -> GpuCalibration:
    """Time `gemms` on this machine's GPU and fit `base` (a gpu profile) to them (module doc)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise InvalidConfigError(f"calibrating {base.name} times matrix products on a CUDA GPU; torch sees none "
                                 "on this machine")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise InvalidConfigError(f"unknown product kind(s) {', '.join(unknown)} (known: {', '.join(KINDS)})")
    if not gemms:
        raise InvalidConfigError("no matrix products to time")
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 on CUDA cores, as the profile prices it
    try:
        checks = {}
        for k in kinds:
            rule = base.rule(*KINDS[k])
            checks[k] = check_kind(k, device, seed) if rule is not None else f"{base.name} cannot run {k}"
        timed = [k for k in kinds if not checks[k]]
        measured, failed = measure_gemms(gemms, timed, device, rounds=rounds, seed=seed, progress=progress)
        bandwidth = copy_bandwidth(device, rounds=rounds) if device == "cuda" else base.mem_bw_bytes_per_s
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    if not measured:
        raise InvalidConfigError("no product could be timed: " + "; ".join(f"{k}: {v}" for k, v in checks.items()))
    eff, overhead, fitted_bw, rms = fit_profile(base, measured, bandwidth)
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu"
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    machine = (f"measured by mpsearch calibrate on {device_name} ({platform.node() or 'this machine'}), {stamp}, "
               f"{software()}")
    where = (f"{machine}: {len(measured)} matrix products ({', '.join(timed)}{'; ' + context if context else ''}), "
             "CUDA-graph replays")
    profile = replace(
        base,
        name=name or f"{base.name}-calibrated",
        description=f"{base.description}; calibrated on {device_name}",
        efficiency={**base.efficiency, **eff},
        layer_overhead_s=overhead,
        mem_bw_bytes_per_s=fitted_bw,
        sources={**base.sources, "efficiency": f"fitted: {where}", "layer_overhead_s": f"fitted: {where}",
                 "mem_bw_bytes_per_s": f"fitted: {where} (a device-to-device copy moved {bandwidth / 1e12:.3g} TB/s, "
                 "bytes read + written)"},
    )
    return GpuCalibration(profile, base, device_name, bandwidth, measured, checks, failed, {"rms_log": rms})


__all__ = ["KINDS", "Gemm", "GpuCalibration", "Measurement", "calibrate_gpu", "check_kind", "gemm_sweep", "layer_gemms",
           "layer_table", "measure_gemms"]
