"""Metrics and label-free proxies over lists of per-batch output tensors."""

from __future__ import annotations

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


def kl_divergence(outputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]) -> float:
    """Mean KL(reference || outputs) over samples, of the softmax distributions (nats)."""
    logq = F.log_softmax(_cat(outputs).double(), dim=1)
    logp = F.log_softmax(_cat(reference).double(), dim=1)
    return float((logp.exp() * (logp - logq)).sum(1).mean())


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
