"""Scores a candidate: its task metric and label-free proxies against the FP32 model.

Everything that does not depend on the candidate is done once and cached in memory:
quantized weights per (layer, precision), activation ranges per layer (observed on the
calibration batches on the FP32 model), and the FP32 reference outputs. Scoring a candidate
swaps cached weight tensors into the model, turns on the activation quantizers the candidate
asks for, and runs the evaluation batches. Identical candidates are scored once.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch

from hw_models import Candidate, Precision
from mpsearch import metrics
from mpsearch.analysis import ModelAnalysis
from mpsearch.errors import EvaluationError
from mpsearch.quant import ActQuantParams, MinMaxObserver, quantize_weight
from mpsearch.tasks.base import Task, run_model


@dataclass(frozen=True)
class Score:
    """The task metric of a candidate (higher is better) and its proxies against FP32."""

    metric: float
    proxies: dict[str, float] = field(default_factory=dict)


class Evaluator:
    """Simulated-quantization scorer for one task.

    Weights: symmetric per-output-channel min-max (mpsearch.quant.quantize_weight).
    Activations: each layer's input, per-tensor asymmetric min-max from the calibration batches.
    """

    def __init__(self, task: Task, analysis: ModelAnalysis):
        self.task = task
        self.analysis = analysis
        self.model = task.model
        if any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules()):
            # channels-last convolutions run ~2x faster on x86 CPUs (oneDNN); same numbers
            self.model.to(memory_format=torch.channels_last)
        self._fp32_weights = {
            fqn: getattr(h.module, h.param).detach() for fqn, h in analysis.handles.items()
        }
        self._weights: dict[tuple[str, Precision], torch.Tensor] = {}
        self._act_params: dict[tuple[str, Precision], ActQuantParams | None] = {}
        self._active: dict[str, ActQuantParams | None] = {}
        self._scores: dict[Candidate, Score] = {}
        self.n_evaluations = 0
        self._observers = self._calibrate()
        self._hooks = [self._install_act_hook(fqn) for fqn in self._observers]
        self.reference_outputs = task.outputs(self.model)

    # -- one-time work -------------------------------------------------------------------
    def _calibrate(self) -> dict[str, MinMaxObserver]:
        """Observe the input range of every layer whose input can be intercepted."""
        observers: dict[str, MinMaxObserver] = {}
        hooks = []
        for fqn, h in self.analysis.handles.items():
            if h.input_module is None:
                continue
            obs = observers[fqn] = MinMaxObserver()

            def observe(x, obs=obs, fqn=fqn):
                if not torch.isfinite(x).all():
                    raise EvaluationError(f"calibration data gives non-finite input to layer {fqn}")
                obs.observe(x)
                return x

            hooks.append(_pre_hook(h.input_module, _inputs(h), observe))
        try:
            with torch.no_grad():
                for i, batch in enumerate(self.task.calib_batches):
                    try:
                        run_model(self.model, batch)
                    except EvaluationError as e:
                        raise EvaluationError(f"calibration batch {i}: {e}") from None
        finally:
            for hk in hooks:
                hk.remove()
        return {fqn: obs for fqn, obs in observers.items() if obs.seen}

    def _install_act_hook(self, fqn: str):
        h = self.analysis.handles[fqn]

        def fake_quant(x, fqn=fqn):
            params = self._active.get(fqn)
            return x if params is None else params.fake_quant(x)

        return _pre_hook(h.input_module, _inputs(h), fake_quant)

    def weight(self, fqn: str, precision: Precision) -> torch.Tensor:
        key = (fqn, precision)
        w = self._weights.get(key)
        if w is None:
            fp32 = self._fp32_weights[fqn]
            w = self._weights[key] = torch.empty_like(fp32).copy_(quantize_weight(fp32, precision))
        return w

    def act_params(self, fqn: str, precision: Precision) -> ActQuantParams | None:
        key = (fqn, precision)
        if key not in self._act_params:
            obs = self._observers.get(fqn)
            if obs is None:
                if precision != Precision.FP32:
                    raise EvaluationError(f"layer {fqn}: its input activation cannot be quantized")
                self._act_params[key] = None
            else:
                self._act_params[key] = obs.params(precision)
        return self._act_params[key]

    # -- per candidate -------------------------------------------------------------------
    def score(self, candidate: Candidate) -> Score:
        cached = self._scores.get(candidate)
        if cached is not None:
            return cached
        try:
            outputs = self._run(candidate)
        except EvaluationError:
            raise
        except Exception as e:  # the model cannot run with these weights
            raise EvaluationError(f"the model failed under this configuration: {type(e).__name__}: {e}") from e
        for i, out in enumerate(outputs):
            if not torch.isfinite(out).all():
                raise EvaluationError(f"non-finite model output on evaluation batch {i}")
        metric = self.task.score_outputs(outputs)
        if not math.isfinite(metric):
            raise EvaluationError(f"the task metric {self.task.metric_name} is not finite ({metric})")
        score = Score(metric, self.proxies(outputs))
        self._scores[candidate] = score
        self.n_evaluations += 1
        return score

    def _run(self, candidate: Candidate) -> list[torch.Tensor]:
        handles = self.analysis.handles
        try:
            for fqn, choice in candidate.items():
                h = handles[fqn]
                getattr(h.module, h.param).data = self.weight(fqn, choice.weight)
                self._active[fqn] = self.act_params(fqn, choice.activation)
            return self.task.outputs(self.model)
        finally:
            self.restore()

    def restore(self) -> None:
        """Put the FP32 weights back and turn every activation quantizer off."""
        for fqn, w in self._fp32_weights.items():
            h = self.analysis.handles[fqn]
            getattr(h.module, h.param).data = w
        self._active.clear()

    def proxies(self, outputs: list[torch.Tensor]) -> dict[str, float]:
        ref = self.reference_outputs
        out = {"sqnr_db": metrics.sqnr_db(outputs, ref)}
        if self.task.kind == "classifier":
            out["kl_to_fp32"] = metrics.kl_divergence(outputs, ref)
            out["top1_agreement"] = metrics.top1_agreement(outputs, ref)
        elif self.task.kind == "embedding":
            out["cosine_to_fp32"] = metrics.mean_cosine(outputs, ref)
        return out

    def close(self) -> None:
        self.restore()
        for hk in self._hooks:
            hk.remove()
        self._hooks = []


def _pre_hook(module: torch.nn.Module, handle_args: tuple[int | str, ...], fn):
    """A forward pre-hook applying fn to the module's inputs `handle_args` (positions or keywords).

    One tensor passed as several arguments (self-attention's query, key and value) is
    transformed once and passed on as one tensor, so `query is key` checks still hold.
    """
    try:
        names = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        names = []
    slots = [(a, a if isinstance(a, int) else (names.index(a) if a in names else None)) for a in handle_args]

    def hook(mod, args, kwargs):
        args, kwargs, memo = list(args), dict(kwargs), {}

        def apply(x):
            if not isinstance(x, torch.Tensor):
                return x
            if id(x) not in memo:
                memo[id(x)] = fn(x)
            return memo[id(x)]

        for name, pos in slots:
            if isinstance(name, str) and name in kwargs:
                kwargs[name] = apply(kwargs[name])
            elif pos is not None and pos < len(args):
                args[pos] = apply(args[pos])
        return tuple(args), kwargs

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _inputs(h) -> tuple[int | str, ...]:
    return (h.input_arg, *h.other_input_args)
