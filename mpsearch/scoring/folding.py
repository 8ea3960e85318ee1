"""Batch-norm folding: the model the evaluator quantizes, as a deployment runtime would run it.

Inference runtimes (ONNX Runtime, TensorRT, torch's quantized engines) fold an eval-mode
BatchNorm into the convolution that feeds it, W' = W * gamma / sqrt(var + eps) per output
channel, b' = (b - mean) * gamma / sqrt(var + eps) + beta, and quantize W'. The evaluator does the
same on a copy of the model: per-tensor weight scales then see the folded weights the device
uses, and a candidate's forward skips the batch-norm passes (on mobilenet_v2 about a quarter of
an FP32 forward on a CPU).

A (convolution, batch norm) pair is folded when the batch norm directly follows the
convolution in an nn.Sequential (so nothing else reads the convolution's output: the torchvision
Conv-BN-activation blocks), the batch norm is in eval mode with running statistics, the channel
counts match, and the convolution's weight is not shared with another module. Other pairs are
left as they are, which is correct, only slower.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping

import torch
from torch import nn

from mpsearch.scoring.analysis import WeightHandle

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(convolution name, batch-norm name) of every pair `fold_batchnorm` folds, in module order."""
    counts: dict[int, int] = {}
    for m in model.modules():
        for p in m.parameters(recurse=False):
            counts[id(p)] = counts.get(id(p), 0) + 1
    pairs = []
    for name, seq in model.named_modules():
        if not isinstance(seq, nn.Sequential):
            continue
        children = list(seq.named_children())
        for (cname, conv), (bname, bn) in itertools.pairwise(children):
            if (
                isinstance(conv, _CONVS)
                and isinstance(bn, _NORMS)
                and not bn.training
                and bn.track_running_stats
                and bn.running_mean is not None
                and bn.num_features == conv.out_channels
                and counts.get(id(conv.weight)) == 1
            ):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + cname, prefix + bname))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, list[tuple[str, str]]]:
    """A copy of `model` with every foldable (conv, batch norm) pair folded into the conv and the
    batch norm replaced by nn.Identity; returns (copy, folded pairs). `model` is not modified;
    the copy computes the same function up to float rounding. With nothing to fold, returns
    `model` itself (no copy) and an empty list."""
    if not foldable_pairs(model):
        return model, []
    folded = copy.deepcopy(model)
    pairs = foldable_pairs(folded)
    modules = dict(folded.named_modules())
    for conv_name, bn_name in pairs:
        conv, bn = modules[conv_name], modules[bn_name]
        k = bn.running_var.double().add(bn.eps).rsqrt()
        if bn.weight is not None:
            k = k * bn.weight.double()
        shift = -bn.running_mean.double() * k
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        w = conv.weight.double() * k.reshape(-1, *([1] * (conv.weight.dim() - 1)))
        conv.weight.copy_(w.to(conv.weight.dtype))
        bias = shift if conv.bias is None else conv.bias.double() * k + shift
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
        parent_name, _, child = bn_name.rpartition(".")
        setattr(modules[parent_name] if parent_name else folded, child, nn.Identity())
    return folded, pairs


def remap_handles(
    handles: Mapping[str, WeightHandle], source: nn.Module, target: nn.Module
) -> dict[str, WeightHandle]:
    """The same handles with their modules looked up by name in `target` (a copy of `source`)."""
    names = {id(m): n for n, m in source.named_modules()}
    modules = dict(target.named_modules())

    def find(m: nn.Module | None) -> nn.Module | None:
        return None if m is None else modules[names[id(m)]]

    return {
        fqn: WeightHandle(find(h.module), h.param, find(h.input_module), h.input_arg, h.other_input_args)
        for fqn, h in handles.items()
    }
