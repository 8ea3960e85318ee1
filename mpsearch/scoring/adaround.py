"""AdaRound: learned up-or-down rounding of low-bit integer weights, one layer at a time.

Reference: M. Nagel, R. A. Amjad, M. van Baalen, C. Louizos, T. Blankevoort, "Up or Down?
Adaptive Rounding for Post-Training Quantization", ICML 2020 (arXiv:2004.10568).

Round-to-nearest minimises the error of every weight on its own; what matters is the error of
the layer's output. AdaRound keeps the quantizer's scales (from `mpsearch.scoring.quant.weight_qparams`)
and only decides, per weight, whether w / scale is rounded down or up, so that the layer's
output on calibration inputs is reconstructed as well as possible:

* w_floor = floor(w / scale); a continuous variable V per weight gives the rectified sigmoid
  h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1), zeta = 1.1, gamma = -0.1, initialised
  so that h(V) equals the fractional part w / scale - w_floor (the soft weight starts at w).
* soft weight: scale * clamp(w_floor + h(V), qmin, qmax) on the grid of
  `mpsearch.scoring.quant.weight_range(bits)` ([-(2^(b-1)-1), 2^(b-1)-1]; every level at 2 and 3 bits).
* loss = rec + reg_weight * sum(1 - |2 h(V) - 1|^beta). rec is the MSE of the layer's output
  with the soft weight against the FP32 output, averaged over all output elements (samples,
  channels, positions). (AIMET / BRECQ sum over output channels instead, i.e. a regulariser
  `out` times weaker; with reg_weight 0.01 the plain mean did as well or better on the layers
  we tried.) The regulariser pushes h(V) to 0 or 1; it is off for the first `warmup` fraction
  of the iterations, then beta anneals linearly from beta_range[0] (20: only values near 0.5
  are pushed) to beta_range[1] (2: all are). Adam (torch's default betas / eps) on V only.
* result: hard rounding, scale * clamp(w_floor + (h(V) >= 0.5), qmin, qmax): every value is on
  the quantizer's grid and is the floor or the ceiling of w / scale (clamped to the grid).
  With iters=0 this is round-to-nearest (h(V) starts at the fractional part).

Defaults: 500 iterations, Adam lr 1e-2, reg_weight 0.01, beta 20 -> 2, 20 % warm-up, batches of
32 samples, seed 0 (the reference uses 10-20k iterations at lr 1e-3; 500 at 1e-2 gets most of
the gain for the small layers this project searches over).

The output error is linear in the weight error dW = W_soft - W (the bias cancels), so it is
computed in one of two ways; the Gram form where it costs at most as many multiply-adds per
iteration as a minibatch, or at most 2^26 (it has no sampling noise, which helps noticeably on
Linear layers), the minibatch form otherwise:

* Gram form (convolutions with many output positions, Linear layers with many tokens per
  sample): the im2col patches of all calibration inputs are reduced once to their second-moment
  matrix H = sum_p x_p x_p^T ([groups, K, K], K = in_channels / groups * prod(kernel)), and
  rec = sum(dW H dW^T) / (N * positions * out) is exactly the MSE on *all* inputs, at a
  per-iteration cost of out * K^2 whatever the data size. No sampling: `batch_size` and `seed`
  have no effect.
* Minibatch form (otherwise, e.g. Linear on [N, F] inputs): each iteration evaluates the layer
  on `batch_size` samples drawn without replacement from `inputs` by a torch.Generator seeded
  with `seed`, at a cost of batch_size * positions * out * K.

Either way the result is deterministic for fixed arguments (on one machine / torch build).

Cost (2 CPU cores, 500 iterations): the Gram form reads the inputs once (im2col in chunks of
~64 MiB) and keeps H (groups * K^2 floats); a 96 -> 24 1x1 conv on 32 inputs of 56 x 56 takes
~0.4-0.6 s, a 64 -> 64 3x3 conv on the same ~1.8 s, a 144-channel depthwise 3x3 ~1.1 s. The
minibatch form keeps a padded copy of conv inputs and costs about 2-3 layer evaluations of a
minibatch per iteration (Linear 512 -> 512 on [256, 512] inputs: ~2.6 s). The weight-sized
state (V, Adam moments, floor, scale) is ~6 copies of the weight.

Supported: nn.Linear (inputs [N, ..., in_features]), nn.Conv1d ([N, C, L]) and nn.Conv2d
([N, C, H, W]) with any stride, padding (including "same" and non-zero padding modes),
dilation and groups; per-channel, per-tensor, and (2-D weights) group-wise scales of shape
[out, in // g, 1]. Bad bit widths, shapes, settings or non-finite values raise ValueError; an
unsupported module raises TypeError.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mpsearch.scoring.quant import WEIGHT_BITS, weight_range

__all__ = ["adaround_weight"]

ZETA = 1.1
GAMMA = -0.1
_UNFOLD_CHUNK_ELEMS = 1 << 24  # floats per im2col chunk when building the Gram matrix (64 MiB)
_MAX_GRAM_ELEMS = 1 << 26  # never keep a Gram matrix above 256 MiB; use minibatches instead
# The Gram form (loss on all inputs, no sampling noise) is used when it costs at most this many
# multiply-adds per iteration, even where a minibatch would be cheaper (~1 s for 500 iterations).
_SMALL_GRAM_MACS = 1 << 26


# -- validation ----------------------------------------------------------------------------
def _plain(t: torch.Tensor) -> torch.Tensor:
    """t detached, as FP32, usable by autograd even if it was made under torch.inference_mode."""
    t = t.detach().to(torch.float32)
    return t.clone() if t.is_inference() else t


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{what} has non-finite values (nan or inf)")


def _check_settings(bits, iters, lr, reg_weight, beta_range, warmup, batch_size) -> None:
    lo, hi = WEIGHT_BITS
    if isinstance(bits, bool) or not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"weight bit width must be an integer in {lo}..{hi}, got {bits!r}")
    for name, value in (("iters", iters), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "iters" else 1):
            raise ValueError(
                f"{name} must be a {'non-negative' if name == 'iters' else 'positive'} integer, got {value!r}"
            )
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(reg_weight, (int, float)) and math.isfinite(reg_weight) and reg_weight >= 0):
        raise ValueError(f"reg_weight must be a non-negative number, got {reg_weight!r}")
    if not (isinstance(warmup, (int, float)) and 0.0 <= warmup <= 1.0):
        raise ValueError(f"warmup must be a fraction in [0, 1], got {warmup!r}")
    try:
        b0, b1 = (float(b) for b in beta_range)
    except (TypeError, ValueError):
        raise ValueError(f"beta_range must be a pair of numbers, got {beta_range!r}") from None
    if not (math.isfinite(b0) and math.isfinite(b1) and b0 > 0 and b1 > 0):
        raise ValueError(f"beta_range must hold two positive numbers, got {beta_range!r}")


def _full_scale(scale: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The scale expanded to w's shape (per-channel / per-tensor, or group-wise [out, in // g, 1])."""
    scale = _plain(scale)
    if w.dim() == 2 and scale.dim() == 3:
        out, inp = w.shape
        if scale.shape[0] != out or scale.shape[2] != 1 or scale.shape[1] == 0 or inp % scale.shape[1]:
            raise ValueError(
                f"group-wise scale of shape {tuple(scale.shape)} does not fit weight {tuple(w.shape)}"
            )
        groups = scale.shape[1]
        full = scale.expand(out, groups, inp // groups).reshape(out, inp)
    else:
        try:
            ok = torch.broadcast_shapes(w.shape, scale.shape) == w.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"scale of shape {tuple(scale.shape)} does not broadcast to weight {tuple(w.shape)}"
            )
        full = scale.expand(w.shape)
    _check_finite(full, "scale")
    if not bool((full > 0).all()):
        raise ValueError("scale must be positive")
    return full.contiguous()


# -- the layer's output error as a function of the weight error ----------------------------
class _Conv:
    """Conv1d / Conv2d as a 2-D convolution on inputs padded once (padding is weight-independent)."""

    def __init__(self, module: nn.Conv1d | nn.Conv2d, x: torch.Tensor) -> None:
        nd = 1 if isinstance(module, nn.Conv1d) else 2
        if x.dim() != nd + 2 or x.shape[1] != module.in_channels:
            want = "[N, C, L]" if nd == 1 else "[N, C, H, W]"
            raise ValueError(
                f"inputs to {type(module).__name__}(in_channels={module.in_channels}) must be batch-first "
                f"{want} with C = {module.in_channels}, got shape {tuple(x.shape)}"
            )
        pad = list(module._reversed_padding_repeated_twice)
        if any(pad):
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, pad, mode=mode)
        if nd == 1:  # as a conv2d over [N, C, 1, L]
            x = x.unsqueeze(2)
            self.kernel = (1, module.kernel_size[0])
            self.stride = (1, module.stride[0])
            self.dilation = (1, module.dilation[0])
        else:
            self.kernel = tuple(module.kernel_size)
            self.stride = tuple(module.stride)
            self.dilation = tuple(module.dilation)
        self.x = x
        self.groups = module.groups
        out_hw = [
            (x.shape[2 + i] - self.dilation[i] * (self.kernel[i] - 1) - 1) // self.stride[i] + 1
            for i in range(2)
        ]
        if min(out_hw) < 1:
            raise ValueError(f"inputs of shape {tuple(x.shape)} are smaller than the kernel")
        self.positions = out_hw[0] * out_hw[1]  # output positions per sample
        self.k = module.in_channels // module.groups * self.kernel[0] * self.kernel[1]

    def error(self, xb: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            xb, dw.reshape(dw.shape[0], -1, *self.kernel), None, self.stride, 0, self.dilation, self.groups
        )

    def gram(self) -> torch.Tensor:
        n, c = self.x.shape[:2]
        h = self.x.new_zeros(self.groups, self.k, self.k)
        per_sample = c * self.kernel[0] * self.kernel[1] * self.positions
        step = max(1, _UNFOLD_CHUNK_ELEMS // per_sample)
        for i in range(0, n, step):
            cols = F.unfold(self.x[i : i + step], self.kernel, dilation=self.dilation, stride=self.stride)
            m = cols.shape[0]
            cols = cols.reshape(m, self.groups, self.k, self.positions).permute(1, 2, 0, 3)
            cols = cols.reshape(self.groups, self.k, m * self.positions)
            h.baddbmm_(cols, cols.transpose(1, 2))
        return h


class _Linear:
    def __init__(self, module: nn.Linear, x: torch.Tensor) -> None:
        if x.dim() < 2 or x.shape[-1] != module.in_features:
            raise ValueError(
                f"inputs to Linear(in_features={module.in_features}) must be batch-first "
                f"[N, ..., {module.in_features}], got shape {tuple(x.shape)}"
            )
        self.x = x
        self.groups = 1
        self.positions = math.prod(x.shape[1:-1])  # tokens per sample
        self.k = module.in_features

    def error(self, xb: torch.Tensor, dw: torch.Tensor) -> torch.Tensor:
        return F.linear(xb, dw)

    def gram(self) -> torch.Tensor:
        x2 = self.x.reshape(-1, self.k)
        return (x2.T @ x2).unsqueeze(0)


# -- AdaRound -------------------------------------------------------------------------------
def _h(v: torch.Tensor) -> torch.Tensor:
    """The rectified sigmoid of AdaRound, in [0, 1]."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _adaround(
    module, weight, scale, bits, inputs, iters, lr, reg_weight, beta_range, warmup, batch_size, seed
) -> torch.Tensor:
    """adaround_weight after the argument checks, in a grad-enabled, non-inference context."""
    qmin, qmax = weight_range(bits)
    with torch.no_grad():
        w = _plain(weight)
        _check_finite(w, "weight")
        x = _plain(inputs).to(w.device)
        _check_finite(x, "inputs")
        s = _full_scale(scale, w).to(w.device)
        layer = _Linear(module, x) if isinstance(module, nn.Linear) else _Conv(module, x)

        n = x.shape[0]
        bsz = min(batch_size, n)
        out = w.shape[0]
        gram_macs = out * layer.k * layer.k  # per iteration, forward
        batch_macs = bsz * layer.positions * out * layer.k
        use_gram = (
            gram_macs <= max(batch_macs, _SMALL_GRAM_MACS)
            and layer.groups * layer.k * layer.k <= _MAX_GRAM_ELEMS
        )
        gram = layer.gram() if use_gram else None
        total_outputs = n * layer.positions * out

        ws = w / s
        w_floor = torch.floor(ws)
        rest = (ws - w_floor).clamp_(0.0, 1.0)
        v = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)

    v.requires_grad_(True)
    # Adam (torch.optim.Adam's defaults: betas 0.9 / 0.999, eps 1e-8), written out: the same
    # update, without the ~2 s first-use import cost of torch.optim in a fresh process.
    m1 = torch.zeros_like(v)
    m2 = torch.zeros_like(v)
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    gen = torch.Generator(device="cpu").manual_seed(seed)
    warm_iters = int(warmup * iters)
    beta_hi, beta_lo = float(beta_range[0]), float(beta_range[1])

    for t in range(iters):
        h = _h(v)
        dw = s * torch.clamp(w_floor + h, qmin, qmax) - w
        if gram is not None:
            dwg = dw.reshape(layer.groups, out // layer.groups, layer.k)
            rec = (torch.bmm(dwg, gram) * dwg).sum() / total_outputs
        else:
            idx = torch.randperm(n, generator=gen)[:bsz].to(x.device)
            rec = layer.error(layer.x[idx], dw).square().mean()
        loss = rec
        if t >= warm_iters and reg_weight > 0:
            progress = (t - warm_iters) / max(1, iters - warm_iters)
            beta = beta_hi + (beta_lo - beta_hi) * progress
            loss = loss + reg_weight * (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()
        (grad,) = torch.autograd.grad(loss, v)
        with torch.no_grad():
            m1.lerp_(grad, 1.0 - beta1)
            m2.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
            denom = (m2 / (1.0 - beta2 ** (t + 1))).sqrt_().add_(eps)
            v.addcdiv_(m1, denom, value=-lr / (1.0 - beta1 ** (t + 1)))

    with torch.no_grad():
        up = (_h(v) >= 0.5).to(torch.float32)
        return s * torch.clamp(w_floor + up, qmin, qmax)


def adaround_weight(
    module: nn.Module,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    inputs: torch.Tensor,
    *,
    iters: int = 500,
    lr: float = 1e-2,
    reg_weight: float = 0.01,
    beta_range: tuple[float, float] = (20.0, 2.0),
    warmup: float = 0.2,
    batch_size: int = 32,
    seed: int = 0,
) -> torch.Tensor:
    """The fake-quantized weight (FP32, same shape and memory format as `weight`) with learned rounding.

    module: an nn.Conv1d, nn.Conv2d or nn.Linear; its stride / padding / padding_mode / dilation
        / groups (or in_features) define the layer. Its own weight and bias are not used (the
        bias cancels in the output error).
    weight: the FP32 weight, shaped like module.weight.
    scale: scales from `mpsearch.scoring.quant.weight_qparams(weight, bits, ...)`: broadcastable to
        weight (per-channel, per-tensor), or group-wise [out, in // g, 1] for a 2-D weight.
    bits: 2..8, on the grid of `mpsearch.scoring.quant.weight_range(bits)`.
    inputs: FP32 calibration inputs of this layer, batch-first: [N, C, H, W] (Conv2d),
        [N, C, L] (Conv1d), [N, ..., in_features] (Linear).
    iters, lr, reg_weight, beta_range, warmup, batch_size, seed: see the module docstring.

    Runs with gradients enabled internally whatever the caller's grad mode (also under
    torch.no_grad / torch.inference_mode) and leaves that mode as it was.
    """
    if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
        raise TypeError(
            f"adaround_weight supports nn.Linear, nn.Conv1d and nn.Conv2d, not {type(module).__name__}"
        )
    _check_settings(bits, iters, lr, reg_weight, beta_range, warmup, batch_size)
    if tuple(weight.shape) != tuple(module.weight.shape):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not match {type(module).__name__} weight "
            f"{tuple(module.weight.shape)}"
        )
    if inputs.dim() == 0 or inputs.shape[0] == 0 or inputs.numel() == 0:
        raise ValueError(f"inputs are empty (shape {tuple(inputs.shape)}); AdaRound needs calibration data")
    with torch.inference_mode(False), torch.enable_grad():
        result = _adaround(
            module, weight, scale, bits, inputs, iters, lr, reg_weight, beta_range, warmup, batch_size, seed
        )
    return torch.empty_like(weight, dtype=torch.float32).copy_(result)
