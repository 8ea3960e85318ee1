"""Simulated (fake) quantization of weights and activations, computed in FP32 torch.

Weights — zero point 0, integer 2..8 bits (`weight_range`): from 4 bits up the symmetric grid
[-(2^(b-1)-1), 2^(b-1)-1] (int8: -127..127, as int8 kernels take it); at 2 and 3 bits every level
of the two's-complement grid, [-2^(b-1), 2^(b-1)-1] (int2: {-2, -1, 0, 1}, not ternary; int3:
-4..3), as low-bit kernel formats store them (INT4 holds both), since a symmetric grid would leave
one of only 4 or 8 levels unused. The min-max scale is the smallest whose grid covers the group's
[min, max]; MSE clipping shrinks it by the error-minimising ratio, on each side's own reach:

* granularity "per_channel" (default; one scale per output channel, axis 0) or "per_tensor";
  group-wise for 2-D (Linear) weights with `group_size=g`: one scale per (output row, run of g
  consecutive input columns).
* clipping "minmax" (scale = max|w| / qmax), "mse" (per scale group, the clipping ratio alpha
  of a 100-point grid from 1.0 down to 0.2 minimising the squared quantize-dequantize error),
  or "auto" (mse at <= 4 bits, minmax above; see `resolve_clipping`).
* float formats: fp16 / bf16 by casting; fp8_e4m3 scaled per tensor so that max|w| maps to
  448 (the e4m3fn maximum), cast to torch.float8_e4m3fn and back, unscaled.

Scale shapes returned by `weight_qparams` (always broadcastable in `fake_quant_weight`):

* per_channel: [out, 1, ..., 1] (w.dim() axes; [out, 1] for a Linear weight)
* per_tensor:  [1, ..., 1] (w.dim() axes)
* group-wise:  [out, in // g, 1], to be used against w.reshape(out, in // g, g);
  `fake_quant_weight` accepts it with the 2-D weight as is and reshapes internally.

Activations — per tensor, asymmetric affine on the unsigned grid [0, 2^b - 1] with a zero
point (zero point 0 when the observed minimum is >= 0, e.g. after ReLU), integer 2..16 bits;
float formats: fp8_e4m3 (scale amax / 448, cast through torch.float8_e4m3fn), and fp16 / bf16
(plain cast) as `FloatActQuantParams`, a subclass of `ActQuantParams`.

Ranges: `MinMaxObserver` (running min / max, one pass) and `HistogramObserver`, used in two
passes over the calibration data so that no activation has to be kept in memory:

    obs = HistogramObserver()
    for x in batches: obs.observe(x)          # pass 1: min / max
    obs.start_histogram()                     # freezes [lo, hi]
    for x in batches: obs.observe(x)          # pass 2: 2048-bin histogram over [lo, hi]
    obs.params(Precision.INT8, method="mse")  # or "minmax", "percentile"

Bad bit widths, unknown granularity / clipping / method names and non-finite tensors raise
ValueError.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from hw_models.precision import Precision

# torch 2.14 marks quantized tensor creation as deprecated; the pinned version still has it.
warnings.filterwarnings("ignore", message=r"torch\.quantize_per_tensor.*deprecated")

__all__ = [
    "ActQuantParams",
    "FloatActQuantParams",
    "HistogramObserver",
    "MinMaxObserver",
    "act_params",
    "fake_quant_weight",
    "float_act_params",
    "int_range",
    "quantize_weight",
    "resolve_clipping",
    "weight_qparams",
    "weight_range",
    "weight_scales",
]

_FLOAT_DTYPES = {
    Precision.FP16: torch.float16,
    Precision.BF16: torch.bfloat16,
    Precision.FP8_E4M3: torch.float8_e4m3fn,
}
FP8_E4M3_MAX = 448.0  # largest finite torch.float8_e4m3fn value
_FP8_E4M3_MIN_EXP = -6  # exponent of the smallest normal e4m3 value (2^-6); subnormals below
_FP8_E4M3_MANTISSA = 3

GRANULARITIES = ("per_channel", "per_tensor")
CLIPPINGS = ("minmax", "mse", "auto")
ACT_METHODS = ("minmax", "percentile", "mse")

WEIGHT_BITS = (2, 8)  # inclusive
FULL_RANGE_MAX_BITS = 3  # weights of this many bits and fewer use every level of their grid (weight_range)
ACT_BITS = (2, 16)

# MSE clipping of weights: alpha grid, searched coarse-to-fine (every 5th point, then the
# neighbours of each group's best), and the number of elements evaluated per torch op.
MSE_ALPHAS = torch.linspace(1.0, 0.2, 100)
_MSE_COARSE_STEP = 5
_MSE_CHUNK_ELEMS = 1 << 16

HIST_BINS = 2048
_HISTC_MAX_CHUNK = 1 << 24  # torch.histc counts in float32: exact only up to 2^24 per bin
_TINY = 1e-12


# -- validation ----------------------------------------------------------------------------
def _check_bits(bits: int, lo_hi: tuple[int, int], what: str) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo_hi[0] <= bits <= lo_hi[1]:
        raise ValueError(f"{what} bit width must be an integer in {lo_hi[0]}..{lo_hi[1]}, got {bits!r}")
    return bits


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} has non-finite values (nan or inf)")


def _check_name(name: str, known: tuple[str, ...], what: str) -> str:
    if name not in known:
        raise ValueError(f"unknown {what} {name!r} (known: {', '.join(known)})")
    return name


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    """Integer grid of a quantizer: symmetric signed [-(2^(b-1)-1), 2^(b-1)-1], unsigned [0, 2^b-1]."""
    _check_bits(bits, (2, 32), "quantizer")
    if signed:
        q = 2 ** (bits - 1) - 1
        return -q, q
    return 0, 2**bits - 1


def weight_range(bits: int) -> tuple[int, int]:
    """Integer grid of a b-bit weight: symmetric [-(2^(b-1)-1), 2^(b-1)-1] from 4 bits up, every
    level of the two's-complement grid [-2^(b-1), 2^(b-1)-1] at FULL_RANGE_MAX_BITS and below."""
    _check_bits(bits, WEIGHT_BITS, "weight")
    if bits <= FULL_RANGE_MAX_BITS:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return int_range(bits, signed=True)


def resolve_clipping(clipping: str, bits: int) -> str:
    """The weight clipping method actually used: "auto" is "mse" at <= 4 bits, "minmax" above."""
    _check_name(clipping, CLIPPINGS, "clipping method")
    if clipping == "auto":
        return "mse" if bits <= 4 else "minmax"
    return clipping


# -- weights -------------------------------------------------------------------------------
def weight_scales(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel scales of a symmetric min-max quantizer (shape [out_channels])."""
    return weight_qparams(w, bits).reshape(-1)


def _scale_groups(
    w: torch.Tensor, granularity: str, group_size: int | None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """w as a [groups, elements] matrix (one row per scale) and the shape of the scale tensor."""
    if group_size is not None:
        if granularity != "per_channel":
            raise ValueError(f"group_size applies to per_channel weights, not {granularity}")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
        if w.dim() != 2:
            raise ValueError(
                f"group-wise quantization needs a 2-D (Linear) weight, got shape {tuple(w.shape)}"
            )
        out, inp = w.shape
        if inp % group_size:
            raise ValueError(f"input dimension {inp} is not divisible by group_size {group_size}")
        return w.reshape(out * (inp // group_size), group_size), (out, inp // group_size, 1)
    if w.dim() == 0:
        raise ValueError("cannot quantize a 0-d weight")
    if granularity == "per_tensor":
        return w.reshape(1, -1), (1,) * w.dim()
    return w.reshape(w.shape[0], -1), (w.shape[0],) + (1,) * (w.dim() - 1)


def _alpha_errors(x: torch.Tensor, amax: torch.Tensor, alphas: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Squared quantize-dequantize error of each row of x [G, n] at clipping ratios alphas [A, G],
    the scale being alpha x amax / qmax."""
    n_alpha = alphas.shape[0]
    chunk = max(1, _MSE_CHUNK_ELEMS // max(1, x.numel()))
    out = torch.empty(n_alpha, x.shape[0], device=x.device)
    for i in range(0, n_alpha, chunk):
        inv = qmax / (alphas[i : i + chunk] * amax)  # [a, G]: 1 / scale
        y = x.unsqueeze(0) * inv.unsqueeze(-1)  # w / scale
        r = torch.round(y).clamp_(qmin, qmax).sub_(y)  # error in units of the scale
        out[i : i + chunk] = torch.linalg.vector_norm(r, dim=-1).square_() / inv.square()
    return out


def _mse_alphas(x: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Per row of x [G, n], the alpha of MSE_ALPHAS minimising the squared error of the grid
    [qmin, qmax] at scale alpha x amax / qmax (vectorised over rows). A symmetric grid is searched
    on |x| (the same errors, the sign does not matter there).

    Coarse-to-fine: every 5th grid point, then the neighbours of each row's best; alpha = 1
    (min-max) is always evaluated and wins ties, so the error is never above min-max's.
    """
    grid = MSE_ALPHAS.to(x.device)
    n_rows = x.shape[0]
    coarse_idx = torch.arange(0, len(grid), _MSE_COARSE_STEP, device=x.device)
    err = _alpha_errors(x, amax, grid[coarse_idx].unsqueeze(1).expand(-1, n_rows), qmin, qmax)
    best_err, pos = err.min(dim=0)  # first minimum: the largest alpha among ties
    best_idx = coarse_idx[pos]
    offsets = torch.tensor([o for o in range(-_MSE_COARSE_STEP + 1, _MSE_COARSE_STEP) if o], device=x.device)
    fine_idx = (best_idx.unsqueeze(0) + offsets.unsqueeze(1)).clamp_(0, len(grid) - 1)  # [A2, G]
    fine_err = _alpha_errors(x, amax, grid[fine_idx], qmin, qmax)
    f_err, f_pos = fine_err.min(dim=0)
    f_idx = fine_idx.gather(0, f_pos.unsqueeze(0)).squeeze(0)
    better = (f_err < best_err) | ((f_err == best_err) & (f_idx < best_idx))
    return grid[torch.where(better, f_idx, best_idx)]


def weight_qparams(
    w: torch.Tensor,
    bits: int,
    *,
    granularity: str = "per_channel",
    clipping: str = "minmax",
    group_size: int | None = None,
) -> torch.Tensor:
    """Scales of an integer weight quantizer (zero point 0, the grid of `weight_range`), FP32.

    Shape: per_channel [out, 1, ..., 1]; per_tensor [1, ..., 1] (both with w.dim() axes, so
    they broadcast against w); group-wise (group_size=g, 2-D w only) [out, in // g, 1], to be
    used against w.reshape(out, in // g, g) — `fake_quant_weight` does that itself.
    """
    _check_bits(bits, WEIGHT_BITS, "weight")
    _check_name(granularity, GRANULARITIES, "granularity")
    method = resolve_clipping(clipping, bits)
    w = w.detach().to(torch.float32)
    _check_finite(w, "weight tensor")
    rows, shape = _scale_groups(w, granularity, group_size)
    qmin, qmax = weight_range(bits)
    if qmin == -qmax:
        x = rows.abs()
        amax = x.amax(dim=1).clamp_min(_TINY)
    else:  # the grid reaches qmax x scale up and -qmin x scale down: the smallest covering [min, max]
        x = rows
        amax = torch.maximum(rows.amax(dim=1), rows.amin(dim=1) * (qmax / qmin)).clamp_min(_TINY)
    if method == "mse":
        amax = amax * _mse_alphas(x, amax, qmin, qmax)
    return (amax / qmax).reshape(shape)


def fake_quant_weight(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Round w / scale, clamp to the grid of `weight_range(bits)`, dequantize; FP32, same shape as w.

    `scale` broadcasts against w, or is a group-wise [out, in // g, 1] scale of a 2-D w.
    """
    qmin, qmax = weight_range(bits)
    w = w.detach().to(torch.float32)
    scale = scale.to(torch.float32)
    if w.dim() == 2 and scale.dim() == 3:
        out, inp = w.shape
        if scale.shape[0] != out or scale.shape[2] != 1 or scale.shape[1] == 0 or inp % scale.shape[1]:
            raise ValueError(
                f"group-wise scale of shape {tuple(scale.shape)} does not fit weight {tuple(w.shape)}"
            )
        wg = w.reshape(out, scale.shape[1], inp // scale.shape[1])
        return (torch.round(wg / scale).clamp_(qmin, qmax) * scale).reshape(out, inp)
    try:
        ok = torch.broadcast_shapes(w.shape, scale.shape) == w.shape
    except RuntimeError:
        ok = False
    if not ok:
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast to weight {tuple(w.shape)}")
    return torch.round(w / scale).clamp_(qmin, qmax) * scale


def _fp8_weight(w: torch.Tensor) -> torch.Tensor:
    amax = float(w.abs().max()) if w.numel() else 0.0
    if amax == 0.0:
        return w.clone()
    scale = amax / FP8_E4M3_MAX
    y = (w / scale).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return y.to(torch.float8_e4m3fn).to(torch.float32).mul_(scale)


def quantize_weight(
    w: torch.Tensor,
    precision: Precision,
    *,
    granularity: str = "per_channel",
    clipping: str = "minmax",
    group_size: int | None = None,
) -> torch.Tensor:
    """The fake-quantized (quantize, then dequantize) copy of a weight tensor, in FP32.

    Integer precisions (int2..int8) use `weight_qparams` + `fake_quant_weight`; fp16 / bf16
    are a cast, fp8_e4m3 a per-tensor scaled cast (granularity, clipping and group_size only
    apply to integer precisions; the granularity and clipping names are checked for all).
    """
    _check_name(granularity, GRANULARITIES, "granularity")
    _check_name(clipping, CLIPPINGS, "clipping method")
    w = w.detach().to(torch.float32)
    _check_finite(w, "weight tensor")
    if precision == Precision.FP32:
        return w.clone()
    if precision == Precision.FP8_E4M3:
        return _fp8_weight(w)
    if precision in _FLOAT_DTYPES:
        return w.to(_FLOAT_DTYPES[precision]).to(torch.float32)
    if not precision.is_int or not WEIGHT_BITS[0] <= precision.bits <= WEIGHT_BITS[1]:
        raise ValueError(
            f"weight precision {precision} is not supported by the quantizer (int2..int8, fp8_e4m3, fp16, bf16, fp32)"
        )
    scale = weight_qparams(
        w, precision.bits, granularity=granularity, clipping=clipping, group_size=group_size
    )
    return fake_quant_weight(w, scale, precision.bits)


# -- activations ---------------------------------------------------------------------------
@dataclass(frozen=True)
class ActQuantParams:
    """Affine parameters of a per-tensor activation quantizer."""

    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
            # the same values through the contiguous NHWC view: torch's quantize kernels take a slow
            # path on channels-last tensors (3-4x here on mobilenet_v2's activations)
            return self.fake_quant(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        if (self.qmin, self.qmax) == (0, 255):
            # torch's quint8 quantize + dequantize: the same rounding and clamping as
            # fake_quantize_per_tensor_affine (checked in tests), ~2.5x faster on CPU because
            # it writes no gradient mask.
            q = torch.quantize_per_tensor(x, self.scale, self.zero_point, torch.quint8)
            return q.dequantize()
        if self.qmax - self.qmin > 255:
            # wide grids (16 bits): round / clamp by hand, in place on one new tensor, the same
            # arithmetic as fake_quantize_per_tensor_affine (x * (1/scale), round half to even)
            y = torch.mul(x, 1.0 / self.scale)
            y.round_().clamp_(self.qmin - self.zero_point, self.qmax - self.zero_point)
            return y.mul_(self.scale)
        return torch.fake_quantize_per_tensor_affine(x, self.scale, self.zero_point, self.qmin, self.qmax)


@dataclass(frozen=True)
class FloatActQuantParams(ActQuantParams):
    """A float-format activation quantizer: x -> cast(clamp(x / scale, qmin, qmax)) * scale.

    `precision` is the format (fp8_e4m3, fp16 or bf16); qmin / qmax are the format's largest
    finite magnitude (448 for e4m3fn) in units of `scale`, zero_point is always 0. fp8 uses a
    per-tensor scale amax / 448; fp16 and bf16 use scale 1 and no clamping (a plain cast).
    """

    zero_point: int = 0
    qmin: int = -int(FP8_E4M3_MAX)
    qmax: int = int(FP8_E4M3_MAX)
    precision: Precision = Precision.FP8_E4M3

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _FLOAT_DTYPES[self.precision]
        if self.precision != Precision.FP8_E4M3:
            return x.to(dtype).to(x.dtype)
        y = torch.mul(x, 1.0 / self.scale).clamp_(self.qmin, self.qmax)
        return y.to(dtype).to(x.dtype).mul_(self.scale)


def float_act_params(amax: float, precision: Precision = Precision.FP8_E4M3) -> FloatActQuantParams:
    """Float-format activation parameters; for fp8_e4m3, amax maps to 448."""
    if precision not in _FLOAT_DTYPES:
        raise ValueError(f"{precision} is not a float activation format (fp8_e4m3, fp16, bf16)")
    if precision != Precision.FP8_E4M3:
        fmax = int(torch.finfo(_FLOAT_DTYPES[precision]).max)
        return FloatActQuantParams(1.0, 0, -fmax, fmax, precision)
    amax = abs(float(amax))
    if not math.isfinite(amax):
        raise ValueError(f"activation range must be finite, got amax={amax}")
    scale = amax / FP8_E4M3_MAX if amax > 0 else 1.0
    return FloatActQuantParams(scale)


def act_params(lo: float, hi: float, bits: int) -> ActQuantParams:
    """Asymmetric affine parameters covering [lo, hi] (always including 0).

    Unsigned grid [0, 2^b - 1] with a zero point; when lo >= 0 (post-ReLU) the zero point is 0
    and the whole grid covers [0, hi]. An empty range (all zeros) gives scale 1.
    """
    _check_bits(bits, ACT_BITS, "activation")
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f"activation range must be finite, got [{lo}, {hi}]")
    qmin, qmax = 0, 2**bits - 1
    if hi - lo <= 0:
        return ActQuantParams(1.0, 0, qmin, qmax)
    scale = (hi - lo) / (qmax - qmin)
    zero_point = round(qmin - lo / scale)
    zero_point = max(qmin, min(qmax, zero_point))
    return ActQuantParams(scale, zero_point, qmin, qmax)


def _range_params(lo: float, hi: float, precision: Precision) -> ActQuantParams | None:
    """Quantizer parameters covering [lo, hi] at `precision` (None for fp32)."""
    if precision == Precision.FP32:
        return None
    if precision in _FLOAT_DTYPES:
        return float_act_params(max(abs(lo), abs(hi)), precision)
    if not precision.is_int:  # pragma: no cover - every Precision is int, float or fp32
        raise ValueError(f"activation precision {precision} is not supported by the quantizer")
    return act_params(lo, hi, precision.bits)


class MinMaxObserver:
    """Running minimum and maximum of every tensor it sees."""

    def __init__(self) -> None:
        self.lo = float("inf")
        self.hi = float("-inf")

    def observe(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        lo, hi = float(lo), float(hi)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError("activation tensor has non-finite values (nan or inf)")
        self.lo = min(self.lo, lo)
        self.hi = max(self.hi, hi)

    @property
    def seen(self) -> bool:
        return self.lo <= self.hi

    def params(self, precision: Precision) -> ActQuantParams | None:
        """Quantizer parameters for `precision`; None when the precision needs no quantizer (fp32)."""
        if precision != Precision.FP32 and not self.seen:
            raise ValueError("the observer has seen no data")
        return _range_params(self.lo, self.hi, precision)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """x as a 1-D tensor in memory order (a view for contiguous and channels-last tensors)."""
    if x.is_contiguous():
        return x.view(-1)
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


class HistogramObserver(MinMaxObserver):
    """Min / max in a first pass, then a fixed histogram over that range in a second pass.

    Pass 1: `observe(x)` tracks min / max (as MinMaxObserver). `start_histogram()` freezes
    [lo, hi]; pass 2: `observe(x)` adds x to a `bins`-bin histogram over [lo, hi] (values
    outside the frozen range land in the end bins) and counts exact zeros. `params` then
    derives ranges from the histogram in milliseconds; memory is O(bins).
    """

    def __init__(self, bins: int = HIST_BINS) -> None:
        super().__init__()
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"bins must be an integer >= 2, got {bins!r}")
        self.bins = bins
        self.hist: torch.Tensor | None = None  # float64 counts once start_histogram() ran
        self.zeros = 0  # elements exactly 0 seen in pass 2 (exact under every quantizer)

    @property
    def histogram_started(self) -> bool:
        return self.hist is not None

    def state_dict(self) -> dict:
        """Plain data (floats and a tensor) for a disk cache; `from_state_dict` restores it."""
        return {"lo": self.lo, "hi": self.hi, "bins": self.bins, "hist": self.hist, "zeros": self.zeros}

    @classmethod
    def from_state_dict(cls, d: dict) -> HistogramObserver:
        obs = cls(int(d["bins"]))
        obs.lo, obs.hi, obs.hist, obs.zeros = float(d["lo"]), float(d["hi"]), d["hist"], int(d["zeros"])
        return obs

    def start_histogram(self) -> None:
        """End pass 1: freeze the observed range and start counting (pass 2)."""
        if not self.seen:
            raise ValueError("start_histogram() needs a first pass: observe at least one tensor")
        self.hist = torch.zeros(self.bins, dtype=torch.float64)
        self.zeros = 0

    def observe(self, x: torch.Tensor) -> None:
        if self.hist is None:
            super().observe(x)
            return
        x = x.detach()
        if x.numel() == 0:
            return
        if x.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        flat = _flat(x)
        if self.hi <= self.lo:  # constant range: every value is counted in the first bin
            _check_finite(flat, "activation tensor")
            self.hist[0] += flat.numel()
        else:
            for chunk in flat.split(_HISTC_MAX_CHUNK):
                h = torch.histc(chunk, self.bins, min=self.lo, max=self.hi)
                if float(h.sum()) < chunk.numel():  # outside the frozen range, or nan
                    _check_finite(chunk, "activation tensor")
                    h = torch.histc(chunk.clamp(self.lo, self.hi), self.bins, min=self.lo, max=self.hi)
                self.hist += h.to(device=self.hist.device, dtype=torch.float64)
        if self.lo <= 0.0 <= self.hi:
            self.zeros += flat.numel() - int(torch.count_nonzero(flat))

    def params(
        self, precision: Precision, method: str = "minmax", percentile: float = 99.99
    ) -> ActQuantParams | None:
        """Quantizer parameters for `precision` over `clip_range(precision, method, percentile)`.

        None for fp32; fp16 / bf16 ignore the range (a plain cast).
        """
        if precision == Precision.FP32:
            _check_name(method, ACT_METHODS, "activation range method")
            return None
        lo, hi = self.clip_range(precision, method, percentile)
        return _range_params(lo, hi, precision)

    def clip_range(
        self, precision: Precision, method: str = "minmax", percentile: float = 99.99
    ) -> tuple[float, float]:
        """The clipping range [lo', hi'] of `method` for `precision` (before `act_params` adds 0).

        minmax: the pass-1 range. percentile: the (100-p)-th and p-th percentiles of the
        histogram (linear inside a bin). mse: the range (lo' <= 0 <= hi', shrunk from [lo, hi]
        over geometric grids refined around the best; for fp8 symmetric, [-m, m]) minimising
        the expected squared quantize-dequantize error, tails' clipping error included, with
        each bin's values taken as uniform inside the bin, exact zeros as error-free and the
        extremes lo, hi as point masses; the error integral of the actual grid (integer:
        scale and rounded zero point as `act_params` makes them; fp8: the e4m3 grid) is
        evaluated in closed form. Percentile and mse need the histogram pass; a few ms.
        """
        _check_name(method, ACT_METHODS, "activation range method")
        if (
            isinstance(percentile, bool)
            or not isinstance(percentile, (int, float))
            or not 50 < percentile <= 100
        ):
            raise ValueError(f"percentile must be in (50, 100], got {percentile!r}")
        if not self.seen:
            raise ValueError("the observer has seen no data")
        if precision.is_int:
            _check_bits(precision.bits, ACT_BITS, "activation")
        if (
            method == "minmax"
            or self.hi <= self.lo
            or precision in (Precision.FP16, Precision.BF16, Precision.FP32)
        ):
            return self.lo, self.hi
        if self.hist is None or float(self.hist.sum()) == 0:
            raise ValueError(
                f"range method {method!r} needs the histogram pass: call start_histogram() and observe again"
            )
        if method == "percentile":
            lo, hi = self._quantiles(1 - percentile / 100, percentile / 100)
            return lo, hi
        if precision == Precision.FP8_E4M3:
            m = self._mse_fp8_amax()
            return -m, m
        return self._mse_int_range(2**precision.bits - 1)

    # -- histogram geometry ------------------------------------------------------------------
    def _edges(self) -> torch.Tensor:
        return torch.linspace(self.lo, self.hi, self.bins + 1, dtype=torch.float64)

    def _quantiles(self, *qs: float) -> list[float]:
        hist = self.hist
        edges = self._edges()
        cdf = hist.cumsum(0)
        total = float(cdf[-1])
        out = []
        for q in qs:
            rank = q * total
            i = int(
                torch.searchsorted(cdf, torch.tensor([rank], dtype=torch.float64))[0].clamp(max=self.bins - 1)
            )
            before = float(cdf[i - 1]) if i > 0 else 0.0
            frac = min(max((rank - before) / max(float(hist[i]), 1.0), 0.0), 1.0)
            out.append(float(edges[i]) * (1 - frac) + float(edges[i + 1]) * frac)
        return out

    def _error_model(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Histogram counts for the error model, and the point masses taken out of them.

        Exact zeros are removed (no error under any range); the observed minimum and maximum
        are point masses at lo and hi (taken out of the end bins), so that clipping the very
        largest value is not costed as clipping a sliver of a uniform bin.
        """
        hist = self.hist.clone()
        if self.zeros and self.lo <= 0.0 <= self.hi:
            k = min(int((0.0 - self.lo) / (self.hi - self.lo) * self.bins), self.bins - 1)
            hist[k] = max(float(hist[k]) - self.zeros, 0.0)
        points = []
        for k, value in ((0, self.lo), (self.bins - 1, self.hi)):
            if value != 0.0 and float(hist[k]) >= 1:
                hist[k] -= 1
                points.append(value)
        return hist, torch.tensor(points, dtype=torch.float64)

    def _occupied(self):
        """Edges x [1, E] of the occupied bins, densities, a per-bin difference, point masses."""
        counts, points = self._error_model()
        nz = torch.nonzero(counts).reshape(-1)  # only occupied bins contribute
        edge_idx = torch.unique(torch.cat([nz, nz + 1]))
        x = self._edges()[edge_idx].unsqueeze(0)
        density = counts[nz] / ((self.hi - self.lo) / self.bins)
        left = torch.searchsorted(edge_idx, nz)  # bin nz[k] spans x[left[k]], x[left[k] + 1]
        if len(edge_idx) == len(nz) + 1:  # contiguous: slices instead of gathers

            def per_bin(f: torch.Tensor) -> torch.Tensor:
                return f[:, 1:] - f[:, :-1]
        else:

            def per_bin(f: torch.Tensor) -> torch.Tensor:
                return f[:, left + 1] - f[:, left]

        return x, density, per_bin, points

    def _mse_int_range(self, levels: int) -> tuple[float, float]:
        """[lo', hi'] minimising the expected squared error of the affine grid with `levels` steps.

        Exact for a density uniform inside each bin: the error integral of the actual
        quantizer (scale and rounded zero point as `act_params` makes them, clamping
        included) is evaluated in closed form at every bin edge, for every candidate.
        """
        x, density, per_bin, points = self._occupied()

        def err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            s = ((b - a) / levels).unsqueeze(1)
            zp = torch.round(-a.unsqueeze(1) / s).clamp_(0, levels)
            xc = torch.clamp(x, -zp * s, (levels - zp) * s)  # x clamped to the grid's range
            d = torch.sub(x, xc).pow_(3)  # 3 x integral of the clipping error^2 from the end
            n = torch.div(xc, s).round_()
            v = torch.addcmul(xc, n, s, value=-1).pow_(3)  # 3 x integral of rounding error^2 from n*s
            # f(x) = integral of error^2 from 0 to x (float64: the bin differences stay exact)
            f = n.mul_(s**3 / 12).add_(v.add_(d), alpha=1 / 3)
            q = torch.round(points / s).clamp_(-zp, levels - zp).mul_(s)
            return per_bin(f) @ density + (points - q).square_().sum(1)

        return _shrink_search(err, min(self.lo, 0.0), max(self.hi, 0.0), (self.hi - self.lo) / self.bins)

    def _mse_fp8_amax(self) -> float:
        """The clipping magnitude m minimising the expected error of e4m3 with scale m / 448.

        The same exact integral as for integer grids, on the e4m3 grid: in scaled units
        y = |x| / s, uniform steps 2^-9 below 2^-5 (subnormals and the first binade), steps
        2^(e-3) in each binade [2^e, 2^(e+1)), clamping at 448.
        """
        x, density, per_bin, points = self._occupied()
        amax = max(abs(self.lo), abs(self.hi))
        sign = torch.sign(x)
        e_lo, e_hi = _FP8_E4M3_MIN_EXP, 8  # binades 2^-6 .. 2^8 (448 = 1.75 * 2^8)
        # integral of error^2 over [0, 2^e) for each binade e (e_lo: none below)
        sub = 2.0 ** (e_lo + 1) * 2.0 ** (2 * (e_lo - _FP8_E4M3_MANTISSA)) / 12
        below = [0.0, sub]
        for e in range(e_lo + 1, e_hi):
            below.append(below[-1] + 2.0**e * 2.0 ** (2 * (e - _FP8_E4M3_MANTISSA)) / 12)
        below_t = torch.tensor(below, dtype=torch.float64)

        def err(_a: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
            s = (m / FP8_E4M3_MAX).unsqueeze(1)
            y = x.abs() / s
            yc = y.clamp(max=FP8_E4M3_MAX)
            e = torch.floor(torch.log2(yc.clamp(min=2.0**e_lo))).clamp_(e_lo, e_hi)
            first = e == e_lo  # [0, 2^(e_lo+1)): one uniform grid from 0 (subnormals + binade e_lo)
            u = torch.exp2(e - _FP8_E4M3_MANTISSA)  # the step; binade e_lo shares the subnormals'
            base = torch.where(first, 0.0, torch.exp2(e))
            idx = torch.where(first, 0, (e - e_lo).long())
            n = torch.round(yc / u)
            v = yc - n * u
            g = below_t[idx] + (n - base / u) * u**3 / 12 + v**3 / 3
            f = sign * s**3 * (g + (y - yc) ** 3 / 3)
            q = (points / s).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).to(torch.float64) * s
            return per_bin(f) @ density + (points - q).square_().sum(1)

        return _shrink_search(err, 0.0, amax, (self.hi - self.lo) / self.bins)[1]


def _shrink_search(err, lo: float, hi: float, width: float) -> tuple[float, float]:
    """The (a, b) = (lo * u, hi * v), 0 < u, v <= 1, with the smallest err(a, b) (vectorised).

    u and v run over geometric grids from 1 (the full range, evaluated first and kept on
    ties) down to one histogram bin, refined around the best (the objective is near
    unimodal in log u, log v); a side that is 0 stays 0. One-sided: 4 stages of 32 points;
    two-sided: 5 stages of 8 x 8.
    """
    sides = [lo < 0, hi > 0]
    k, stages = (32, 4) if sum(sides) == 1 else (8, 5)

    def grid(top: float, bottom: float) -> torch.Tensor:
        return torch.logspace(math.log10(top), math.log10(bottom), k, dtype=torch.float64)

    lows = [min(1.0, width / abs(x)) if on else 1.0 for x, on in zip((lo, hi), sides)]
    grids = [
        grid(1.0, m) if on and m < 1 else torch.ones(1, dtype=torch.float64) for m, on in zip(lows, sides)
    ]
    best_e, best_u, best_v = math.inf, 1.0, 1.0
    for _ in range(stages):
        u, v = torch.meshgrid(grids[0], grids[1], indexing="ij")
        e = err(lo * u.reshape(-1), hi * v.reshape(-1))
        i = int(torch.argmin(e))
        if float(e[i]) < best_e:
            best_e, best_u, best_v = float(e[i]), float(u.reshape(-1)[i]), float(v.reshape(-1)[i])
        new = []
        for g, b, m in zip(grids, (best_u, best_v), lows):
            if len(g) == 1:
                new.append(g)
                continue
            ratio = float(g[0] / g[1]) if g[0] > g[1] else 1.0
            new.append(grid(min(1.0, b * ratio), max(m, b / ratio)))
        grids = new
    return lo * best_u, hi * best_v
