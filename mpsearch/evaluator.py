"""Scores a candidate: its task metric and label-free proxies against the FP32 model.

Everything that does not depend on the candidate is done once and cached: quantized weights
per (layer, precision), activation quantizer parameters per (layer, precision) from ranges
observed on the calibration batches on the FP32 model, bias corrections per (layer, precision),
and the FP32 reference outputs. The caches live in memory and can be written to disk
(`save_cache`), keyed by a hash of the model, the data and the quantizer settings, so a resumed
or distributed search reuses them. Scoring a candidate swaps cached weight tensors into the
model, turns on the activation quantizers and bias corrections it asks for, and runs the
evaluation batches. Identical candidates are scored once.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from hw_models import Candidate, Precision
from mpsearch import metrics
from mpsearch.analysis import ModelAnalysis
from mpsearch.cache import atomic_write_bytes
from mpsearch.errors import EvaluationError, InvalidConfigError
from mpsearch.quant import ActQuantParams, HistogramObserver, quantize_weight, resolve_clipping
from mpsearch.tasks.base import Task, run_model

CACHE_VERSION = 1
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
WEIGHT_CLIPPINGS = ("auto", "minmax", "mse")
ACT_RANGES = ("minmax", "percentile", "mse")
BIAS_CORRECTIONS = ("auto", "on", "off")


@dataclass(frozen=True)
class QuantSettings:
    """How the evaluator quantizes (candidate-independent choices).

    weight_granularity: "per_channel" (default) or "per_tensor" symmetric integer weights.
    weight_clipping: "minmax", "mse", or "auto" (MSE-optimal for 4 bits and below, else min-max).
    group_size: group-wise scales for Linear weights (e.g. 32/64/128 input columns per scale).
    act_range: activation ranges from the calibration batches by "minmax", "percentile" or "mse".
    act_percentile: the percentile for act_range="percentile".
    bias_correction: subtract the expected output shift (W_q - W) E[x] caused by weight
        quantization, with E[x] the layer's mean input on the calibration batches. "auto" applies
        it to integer weights of 6 bits and below (at 8 bits the shift is negligible), "on" to
        every quantized weight, "off" never. Conv/Linear layers only.
    """

    weight_granularity: str = "per_channel"
    weight_clipping: str = "auto"
    group_size: int | None = None
    act_range: str = "minmax"
    act_percentile: float = 99.99
    bias_correction: str = "auto"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES),
            ("weight_clipping", self.weight_clipping, WEIGHT_CLIPPINGS),
            ("act_range", self.act_range, ACT_RANGES),
            ("bias_correction", self.bias_correction, BIAS_CORRECTIONS),
        ):
            if value not in allowed:
                raise InvalidConfigError(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.group_size is not None and self.group_size < 1:
            raise InvalidConfigError(f"group_size must be positive, got {self.group_size}")
        if not 50 < self.act_percentile <= 100:
            raise InvalidConfigError(f"act_percentile must be in (50, 100], got {self.act_percentile}")

    def corrects_bias(self, precision: Precision) -> bool:
        if self.bias_correction == "off" or not precision.is_int:
            return False
        return self.bias_correction == "on" or precision.bits <= 6

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Score:
    """The task metric of a candidate (higher is better) and its proxies against FP32."""

    metric: float
    proxies: dict[str, float] = field(default_factory=dict)


class Evaluator:
    """Simulated-quantization scorer for one task (see QuantSettings for the methods)."""

    def __init__(
        self,
        task: Task,
        analysis: ModelAnalysis,
        settings: QuantSettings | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.task = task
        self.analysis = analysis
        self.settings = settings or QuantSettings()
        self.model = task.model
        if any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules()):
            # channels-last convolutions run ~2x faster on x86 CPUs (oneDNN); same numbers
            self.model.to(memory_format=torch.channels_last)
        self._fp32_weights = {
            fqn: getattr(h.module, h.param).detach() for fqn, h in analysis.handles.items()
        }
        self._weights: dict[tuple[str, Precision], torch.Tensor] = {}
        self._act_params: dict[tuple[str, Precision], ActQuantParams | None] = {}
        self._bias_delta: dict[tuple[str, Precision], torch.Tensor | None] = {}
        self._active: dict[str, ActQuantParams | None] = {}
        self._active_delta: dict[str, torch.Tensor] = {}
        self._scores: dict[Candidate, Score] = {}
        self.n_evaluations = 0
        self.cache_path = Path(cache_dir) / f"evaluator-{self.cache_key()}.pt" if cache_dir else None
        self.cache_loaded = self.cache_path is not None and self._load_cache()
        # how many quantized weights the file on disk holds (None: no file yet)
        self._weights_on_disk = len(self._weights) if self.cache_loaded else None
        if not self.cache_loaded:
            self._observers, self._input_means = self._calibrate()
            self.reference_outputs = self.task.outputs(self.model)
        self._hooks = [self._install_act_hook(fqn) for fqn in self._observers]
        self._hooks += [self._install_bias_hook(fqn) for fqn in self._input_means]

    # -- one-time work -------------------------------------------------------------------
    def _calibrate(self) -> tuple[dict[str, HistogramObserver], dict[str, torch.Tensor]]:
        """Observe each layer's input on the calibration batches: range (and histogram when the
        range method needs one) and, for bias correction, its mean per input channel."""
        observers: dict[str, HistogramObserver] = {}
        sums: dict[str, list] = {}
        hooks = []
        for fqn, h in self.analysis.handles.items():
            if h.input_module is None:
                continue
            obs = observers[fqn] = HistogramObserver()
            channel_dim = _channel_dim(h)
            if channel_dim is not None:
                sums[fqn] = [None, 0]

            def observe(x, obs=obs, fqn=fqn, channel_dim=channel_dim):
                if not torch.isfinite(x).all():
                    raise EvaluationError(f"non-finite input to layer {fqn}")
                obs.observe(x)
                if channel_dim is not None and not obs.histogram_started:
                    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
                    acc = sums[fqn]
                    s = x.detach().double().sum(dim=dims)
                    acc[0] = s if acc[0] is None else acc[0] + s
                    acc[1] += x.numel() // x.shape[channel_dim]
                return x

            hooks.append(_pre_hook(h.input_module, _inputs(h), observe))
        passes = 2 if self.settings.act_range != "minmax" else 1
        try:
            with torch.no_grad():
                for p in range(passes):
                    if p == 1:
                        for obs in observers.values():
                            if obs.seen:
                                obs.start_histogram()
                    for i, batch in enumerate(self.task.calib_batches):
                        try:
                            run_model(self.model, batch)
                        except EvaluationError as e:
                            raise EvaluationError(f"calibration batch {i}: {e}") from None
        finally:
            for hk in hooks:
                hk.remove()
        means = {fqn: (acc[0] / acc[1]).float() for fqn, acc in sums.items() if acc[1]}
        return {fqn: obs for fqn, obs in observers.items() if obs.seen}, means

    def _install_act_hook(self, fqn: str):
        h = self.analysis.handles[fqn]

        def fake_quant(x, fqn=fqn):
            params = self._active.get(fqn)
            return x if params is None else params.fake_quant(x)

        return _pre_hook(h.input_module, _inputs(h), fake_quant)

    def _install_bias_hook(self, fqn: str):
        def correct(module, args, output, fqn=fqn):
            delta = self._active_delta.get(fqn)
            return output if delta is None else output - delta

        return self.analysis.handles[fqn].module.register_forward_hook(correct)

    def weight(self, fqn: str, precision: Precision) -> torch.Tensor:
        """The fake-quantized weight of a layer (cached; same memory format as the FP32 one)."""
        key = (fqn, precision)
        w = self._weights.get(key)
        if w is None:
            fp32 = self._fp32_weights[fqn]
            s = self.settings
            q = quantize_weight(
                fp32,
                precision,
                granularity=s.weight_granularity,
                clipping=resolve_clipping(s.weight_clipping, precision.bits) if precision.is_int else "minmax",
                group_size=s.group_size if fp32.dim() == 2 else None,
            )
            w = self._weights[key] = torch.empty_like(fp32).copy_(q)
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
                self._act_params[key] = obs.params(
                    precision, method=self.settings.act_range, percentile=self.settings.act_percentile
                )
        return self._act_params[key]

    def bias_delta(self, fqn: str, precision: Precision) -> torch.Tensor | None:
        """Expected output shift (W_q - W) E[x] of the layer at this weight precision, shaped to
        broadcast against its output; None where bias correction does not apply."""
        key = (fqn, precision)
        if key not in self._bias_delta:
            mean = self._input_means.get(fqn)
            delta = None
            if mean is not None and self.settings.corrects_bias(precision):
                dw = (self.weight(fqn, precision) - self._fp32_weights[fqn]).float()
                module = self.analysis.handles[fqn].module
                if dw.dim() == 2:  # linear: [out, in] @ [in]
                    delta = dw @ mean
                else:  # conv: sum over kernel positions, input channels within each group
                    groups = getattr(module, "groups", 1)
                    out_ch, in_per_group = dw.shape[0], dw.shape[1]
                    m = mean.reshape(groups, in_per_group)
                    per_in = dw.reshape(groups, out_ch // groups, in_per_group, -1).sum(-1)
                    delta = torch.einsum("goi,gi->go", per_in, m).reshape(out_ch)
                    delta = delta.reshape(1, -1, *([1] * (dw.dim() - 2)))
            self._bias_delta[key] = delta
        return self._bias_delta[key]

    # -- disk cache ----------------------------------------------------------------------
    def cache_key(self) -> str:
        """Hash of the model's parameters and buffers, the data, the quantizer settings."""
        h = hashlib.sha256(f"mpsearch-evaluator/{CACHE_VERSION}".encode())
        h.update(json.dumps(self.settings.to_dict(), sort_keys=True).encode())
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            _hash_tensor(h, t)
        for batch in self.task.calib_batches:
            _hash_tensor(h, batch)
        for inputs, target in self.task.eval_batches:
            _hash_tensor(h, inputs)
            if isinstance(target, torch.Tensor):
                _hash_tensor(h, target)
        h.update(",".join(self.analysis.fqns).encode())
        return h.hexdigest()[:24]

    def save_cache(self) -> Path | None:
        """Write the candidate-independent caches to disk (atomically); returns the path.

        Skipped when the file on disk already holds everything computed in memory.
        """
        if self.cache_path is None:
            return None
        if len(self._weights) == self._weights_on_disk:
            return self.cache_path
        state = {
            "version": CACHE_VERSION,
            "observers": {fqn: obs.state_dict() for fqn, obs in self._observers.items()},
            "input_means": self._input_means,
            "reference_outputs": self.reference_outputs,
            "weights": {f"{fqn}|{p.value}": w.contiguous() for (fqn, p), w in self._weights.items()},
        }
        buf = io.BytesIO()
        torch.save(state, buf)
        self.cache_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.cache_path, buf.getvalue())
        self._weights_on_disk = len(self._weights)
        return self.cache_path

    def _load_cache(self) -> bool:
        if not self.cache_path.exists():
            return False
        try:
            state = torch.load(self.cache_path, map_location="cpu", weights_only=True)
            if state.get("version") != CACHE_VERSION:
                return False
            self._observers = {fqn: HistogramObserver.from_state_dict(d) for fqn, d in state["observers"].items()}
            self._input_means = state["input_means"]
            self.reference_outputs = state["reference_outputs"]
            for key, w in state["weights"].items():
                fqn, p = key.rsplit("|", 1)
                fp32 = self._fp32_weights[fqn]
                self._weights[(fqn, Precision(p))] = torch.empty_like(fp32).copy_(w)
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
            print(f"mpsearch: warning: evaluator cache {self.cache_path} unusable ({type(e).__name__}); "
                  "rebuilding it", file=sys.stderr)
            self._weights.clear()
            return False
        return True

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
        try:
            metric = self.task.score_outputs(outputs)
        except Exception as e:
            raise EvaluationError(
                f"the task metric {self.task.metric_name} raised {type(e).__name__}: {e}"
            ) from e
        if not math.isfinite(metric):
            raise EvaluationError(f"the task metric {self.task.metric_name} is not finite ({metric})")
        score = Score(metric, self.proxies(outputs))
        self._scores[candidate] = score
        self.n_evaluations += 1
        return score

    def outputs(self, candidate: Candidate) -> list[torch.Tensor]:
        """The simulated-quantized model's outputs on the evaluation batches (not memoized)."""
        return self._run(candidate)

    def _run(self, candidate: Candidate) -> list[torch.Tensor]:
        handles = self.analysis.handles
        try:
            for fqn, choice in candidate.items():
                h = handles[fqn]
                getattr(h.module, h.param).data = self.weight(fqn, choice.weight)
                self._active[fqn] = self.act_params(fqn, choice.activation)
                delta = self.bias_delta(fqn, choice.weight)
                if delta is not None:
                    self._active_delta[fqn] = delta
            return self.task.outputs(self.model)
        finally:
            self.restore()

    def restore(self) -> None:
        """Put the FP32 weights back and turn every activation quantizer off."""
        for fqn, w in self._fp32_weights.items():
            h = self.analysis.handles[fqn]
            getattr(h.module, h.param).data = w
        self._active.clear()
        self._active_delta.clear()

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


def input_pre_hook(h, fn, prepend: bool = False):
    """A forward pre-hook applying fn to a layer's input (every argument its handle names)."""
    return _pre_hook(h.input_module, _inputs(h), fn, prepend)


def _pre_hook(module: torch.nn.Module, handle_args: tuple[int | str, ...], fn, prepend: bool = False):
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

    return module.register_forward_pre_hook(hook, with_kwargs=True, prepend=prepend)


def _inputs(h) -> tuple[int | str, ...]:
    return (h.input_arg, *h.other_input_args)


def _channel_dim(h) -> int | None:
    """The input's channel dimension for bias correction: conv inputs [N, C, ...] -> 1,
    linear inputs [..., F] -> -1; None for layers bias correction does not handle."""
    m = h.module
    if h.input_module is not m or h.param != "weight":
        return None
    if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d)):
        return 1
    if isinstance(m, torch.nn.Linear):
        return -1
    return None


def _hash_tensor(h, t) -> None:
    if isinstance(t, (tuple, list)):
        for x in t:
            _hash_tensor(h, x)
        return
    if isinstance(t, torch.Tensor):
        shape = tuple(t.shape)
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{t.dtype}{shape}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
