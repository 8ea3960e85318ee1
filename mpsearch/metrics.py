"""Metrics and label-free proxies over lists of per-batch output tensors, and the 95% confidence
intervals a score reports beside its metric and its KL to FP32 (`Evaluator.score`):

- a metric that is a share of the evaluation samples (accuracy, top-1 agreement: is_proportion):
  the Wilson score interval of that share over the n samples. Unlike share +- 1.96 standard
  errors it stays within [0, 1] and is not empty at 0 or 1: 256 of 256 crops agreeing with FP32
  gives 0.985..1, the set's resolution, not 1..1;
- any other metric: the metric +- 1.96 standard errors of its per-batch values (sd / sqrt(k) over
  k batches; none with one batch);
- the KL to FP32: its mean +- 1.96 standard errors of the per-sample KLs, at least 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _cat(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(x.shape[0], -1) if x.dim() > 2 else x for x in xs])


def accuracy(outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> float:
    """Share of samples whose arg-max output equals the integer label."""
    pred = _cat(outputs).argmax(dim=1)
    return float((pred == torch.cat(list(targets))).float().mean())


def top1_agreement(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Share of samples whose arg-max equals the arg-max of the reference outputs."""
    return float((_cat(outputs).argmax(1) == _cat(reference).argmax(1)).float().mean())


def kl_per_sample(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> torch.Tensor:
    """KL(reference || outputs) of each sample's softmax distributions (nats, float64)."""
    logq = F.log_softmax(_cat(outputs).double(), dim=1)
    logp = F.log_softmax(_cat(reference).double(), dim=1)
    return (logp.exp() * (logp - logq)).sum(1)


def kl_divergence(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Mean KL(reference || outputs) over samples, of the softmax distributions (nats)."""
    return float(kl_per_sample(outputs, reference).mean())


def mean_cosine(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Mean cosine similarity between each sample's output and its reference output."""
    return float(F.cosine_similarity(_cat(outputs).double(), _cat(reference).double(), dim=1).mean())


def sqnr_db(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Signal-to-quantization-noise ratio of the outputs against the reference, in dB."""
    ref = _cat(reference).double()
    noise = (_cat(outputs).double() - ref).pow(2).sum()
    if noise == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / noise))


# -- confidence intervals (module doc) ---------------------------------------------------------
Z95 = 1.959963984540054  # the two-sided 95% quantile of the normal distribution
PROPORTION_METRICS = ("accuracy", "top1_agreement")


def is_proportion(metric_fn, metric_name: str, fp32_metric: float) -> bool:
    """Whether a task's metric is a share of its evaluation samples: mpsearch's accuracy or
    top1_agreement, or a metric named so whose FP32 value lies in [0, 1]."""
    if metric_fn in (accuracy, top1_agreement):
        return True
    return metric_name.lower() in PROPORTION_METRICS and 0.0 <= fp32_metric <= 1.0


def n_eval_samples(eval_batches) -> int | None:
    """The number of evaluation samples: the first dimension of each batch's target (None when a
    target is not a tensor, or not one sample a row)."""
    n = 0
    for _, target in eval_batches:
        shape = getattr(target, "shape", None)
        if not shape:
            return None
        n += int(shape[0])
    return n or None


def wilson_interval(share: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a share of n samples (95% by default)."""
    if n < 1 or not 0.0 <= share <= 1.0:
        raise ValueError(f"a share in [0, 1] of at least one sample, got {share} of {n}")
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (share + z2 / (2 * n)) / denom
    half = z * math.sqrt(share * (1.0 - share) / n + z2 / (4 * n * n)) / denom
    # at 0 or 1 one end is the share itself (written so, not left to rounding)
    return (0.0 if share == 0.0 else max(0.0, centre - half)), (1.0 if share == 1.0 else min(1.0, centre + half))


def standard_error(values: Sequence[float]) -> float | None:
    """The standard error of the mean of `values` (sample standard deviation / sqrt(n)); None
    under two values."""
    n = len(values)
    if n < 2:
        return None
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
