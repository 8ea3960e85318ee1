"""The Task type: a model, its data and its metric."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# A batch of model inputs: one tensor, or a tuple of tensors passed positionally.
Batch = torch.Tensor | tuple[torch.Tensor, ...]

# metric_fn(outputs, targets) -> float, higher is better. outputs[i] is the model's output
# tensor on eval_batches[i]'s inputs, targets[i] that batch's target.
MetricFn = Callable[[Sequence[torch.Tensor], Sequence[Any]], float]


def run_model(model: nn.Module, inputs: Batch) -> torch.Tensor:
    """Call the model on one batch of inputs (a tensor or a tuple of tensors)."""
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """The batches' samples as one batch, in order (each tensor of a tuple concatenated)."""
    if isinstance(batches[0], tuple):
        return tuple(torch.cat(xs) for xs in zip(*batches, strict=True))
    return torch.cat(list(batches))


def take_samples(batch: Batch, idx: torch.Tensor | slice) -> Batch:
    """The samples `idx` (indices or a slice) of a batch (of each of its tensors, for a tuple)."""
    if isinstance(batch, tuple):
        return tuple(x[idx] for x in batch)
    return batch[idx]


def first_samples(batch: Batch, n: int) -> Batch:
    """The first `n` samples of a batch (of each of its tensors, for a tuple)."""
    return take_samples(batch, slice(None, n))


@dataclass
class Task:
    """Everything a search needs to score a configuration.

    model:         the FP32 model, in eval mode; its output on a batch must be a tensor.
    calib_batches: inputs used to calibrate activation ranges (no targets).
    eval_batches:  (inputs, target) pairs; the metric is computed over all of them.
    metric_name:   what the metric is called in tables and MLflow ("accuracy", ...).
    metric_fn:     metric_fn(outputs, targets) -> float, higher is better.
    fp32_metric:   the metric of the unquantized model; computed on construction if None.
    kind:          "classifier" (outputs are logits: KL and top-1 agreement proxies apply)
                   or "embedding" (cosine similarity applies) or "other".
    """

    name: str
    model: nn.Module
    calib_batches: list[Batch]
    eval_batches: list[tuple[Batch, Any]]
    metric_name: str
    metric_fn: MetricFn
    fp32_metric: float | None = None
    kind: str = "classifier"
    description: str = ""
    extras: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from mpsearch.errors import TaskLoadError

        if not isinstance(self.model, nn.Module):
            raise TaskLoadError(f"task {self.name!r}: model is {type(self.model).__name__}, not an nn.Module")
        if not self.calib_batches:
            raise TaskLoadError(f"task {self.name!r}: the calibration set is empty")
        if not self.eval_batches:
            raise TaskLoadError(f"task {self.name!r}: the evaluation set is empty")
        self.model.eval()
        if self.fp32_metric is None:
            self.fp32_metric = self.evaluate(self.model)
        if not math.isfinite(self.fp32_metric):
            raise TaskLoadError(f"task {self.name!r}: the FP32 metric is not finite ({self.fp32_metric})")

    @property
    def example_input(self) -> Batch:
        return self.calib_batches[0]

    @torch.no_grad()
    def outputs(self, model: nn.Module) -> list[torch.Tensor]:
        return [run_model(model, inputs) for inputs, _ in self.eval_batches]

    def score_outputs(self, outputs: Sequence[torch.Tensor]) -> float:
        return float(self.metric_fn(outputs, [t for _, t in self.eval_batches]))

    def evaluate(self, model: nn.Module) -> float:
        """The task metric of `model` on the evaluation batches."""
        return self.score_outputs(self.outputs(model))
