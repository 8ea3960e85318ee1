"""Scores a candidate: its task metric and label-free proxies against the FP32 model.

The model scored is a copy (the task's model is never modified) with batch norms folded into
the convolutions that feed them, as an inference runtime runs it (mpsearch.scoring.folding;
QuantSettings.fold_batchnorm). Everything that does
not depend on the candidate is done once and cached: quantized weights
per (layer, precision), activation quantizer parameters per (layer, precision) from ranges
observed on the calibration batches on the FP32 model, bias corrections per (layer, precision),
and the FP32 reference outputs. The caches live in memory and can be written to disk
(`save_cache`), keyed by a hash of the model, the data and the quantizer settings, so a resumed
or distributed search reuses them. Scoring a candidate swaps cached weight tensors into the
model, turns on the activation quantizers and bias corrections it asks for, and runs the
evaluation batches. Identical candidates are scored once.

Which activations are quantized is what the deployed graph quantizes (hw_models.graph): an
int8 layer's input and, for a convolution, its output; residual Adds and poolings between int8
tensors; every consumer of a quantized tensor sees its int8 values. The evaluator reads the
model's FP32 ONNX export once (`deploy_graph`) and simulates each quantized tensor with the input
quantizers of the layers reading it or a forward hook on the module returning it. A model that
cannot be exported to ONNX is simulated with each layer's input quantizer alone (`deploy_note`
says why) and cannot be deployed.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from hw_models import Candidate, Precision
from hw_models.graph import DeployGraph, Plan, Point
from mpsearch import metrics
from mpsearch.cache import atomic_write_bytes
from mpsearch.errors import EvaluationError, InvalidConfigError, MpsearchError
from mpsearch.onnx_export import export_fp32, fixed_sizes
from mpsearch.scoring.adaround import adaround_weight
from mpsearch.scoring.analysis import ModelAnalysis, pre_hook
from mpsearch.scoring.folding import fold_batchnorm, remap_handles
from mpsearch.scoring.onnx_graph import read_graph, read_layout
from mpsearch.scoring.quant import (
    ActQuantParams,
    HistogramObserver,
    fake_quant_weight,
    quantize_weight,
    resolve_clipping,
    weight_qparams,
)
from mpsearch.tasks.base import Task, run_model

CACHE_VERSION = 5  # 5: int2 / int3 weights use every level of their grid
WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
WEIGHT_CLIPPINGS = ("auto", "minmax", "mse")
ACT_RANGES = ("minmax", "percentile", "mse")
WEIGHT_ROUNDINGS = ("nearest", "adaround")
ADAROUND_MAX_BITS = 4  # learned rounding for integer weights of this many bits and fewer
ADAROUND_SAMPLES = 64  # calibration samples whose layer inputs AdaRound reconstructs
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
    fold_batchnorm: quantize (and run) a copy of the model with eval-mode batch norms folded
        into the convolutions before them, as inference runtimes do (see mpsearch.scoring.folding).
    weight_rounding: "nearest", or "adaround": learned up-or-down rounding (mpsearch.scoring.adaround)
        of integer weights of ADAROUND_MAX_BITS bits and fewer in Conv1d/Conv2d/Linear layers,
        fit to reconstruct each layer's output on the FP32 inputs of the first ADAROUND_SAMPLES
        calibration samples; the scales (clipping) stay those of weight_clipping. Computed once
        per (layer, precision) and cached like every quantized weight (~0.5-2 s a layer here).
    """

    weight_granularity: str = "per_channel"
    weight_clipping: str = "auto"
    group_size: int | None = None
    act_range: str = "minmax"
    act_percentile: float = 99.99
    bias_correction: str = "auto"
    fold_batchnorm: bool = True
    weight_rounding: str = "nearest"

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("weight_granularity", self.weight_granularity, WEIGHT_GRANULARITIES),
            ("weight_clipping", self.weight_clipping, WEIGHT_CLIPPINGS),
            ("weight_rounding", self.weight_rounding, WEIGHT_ROUNDINGS),
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
    """The task metric of a candidate (higher is better) and its proxies against FP32.

    fidelity: the share of the evaluation batches scored. Below 1 the candidate was stopped
    early (`Evaluator.score(..., stop_below=...)`): metric and proxies are on those batches only,
    and metric_upper is the upper confidence bound of the full metric that fell below the
    threshold.
    intervals: 95% confidence intervals (low, high) of "metric" and, for classifiers, of
    "kl_to_fp32", on the batches scored (`Evaluator.intervals`, mpsearch.metrics' module doc).
    """

    metric: float
    proxies: dict[str, float] = field(default_factory=dict)
    fidelity: float = 1.0
    metric_upper: float | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)


# Multi-fidelity scoring: where (share of the evaluation batches) a candidate may be stopped,
# and how many standard errors its upper confidence bound allows (see Evaluator.score).
EARLY_STOP_AT = (0.25, 0.5)
EARLY_STOP_Z = 3.0


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
        # a copy with batch norms folded into their convolutions (mpsearch.scoring.folding)
        self.model, self.folded = fold_batchnorm(task.model) if self.settings.fold_batchnorm else (task.model, [])
        if self.model is task.model:
            # nothing folded: a copy all the same, since scoring swaps weights into the model and
            # puts it in channels-last format; the task's model stays as the user gave it
            self.model = copy.deepcopy(task.model)
        self.handles = remap_handles(analysis.handles, task.model, self.model)
        if any(isinstance(m, torch.nn.Conv2d) for m in self.model.modules()):
            # channels-last convolutions run ~2x faster on x86 CPUs (oneDNN); same numbers
            self.model.to(memory_format=torch.channels_last)
        self._fp32_weights = {
            fqn: getattr(h.module, h.param).detach() for fqn, h in self.handles.items()
        }
        self._weights: dict[tuple[str, Precision], torch.Tensor] = {}
        self._act_params: dict[tuple[str, Precision], ActQuantParams | None] = {}
        self._bias_delta: dict[tuple[str, Precision], torch.Tensor | None] = {}
        self._active: dict[str, ActQuantParams | None] = {}
        self._active_delta: dict[str, torch.Tensor] = {}
        self._active_out: dict[str, ActQuantParams] = {}  # module -> its output quantizer
        self._plans: dict[Candidate, Plan] = {}
        self._fp32_onnx = None
        self._fingerprint: str | None = None
        self._fp32_layout = None
        self.deploy_graph: DeployGraph | None = None
        self.deploy_note = ""
        self._out_observers: dict[str, HistogramObserver] = {}
        self._scores: dict[Candidate, Score] = {}
        self._partial: dict[Candidate, Score] = {}  # stopped early (fidelity < 1)
        self.n_evaluations = 0  # candidate runs, full or stopped early
        self.n_batches_scored = 0  # evaluation batches run over all candidates
        self.cache_path = Path(cache_dir) / f"evaluator-{self.cache_key()}.pt" if cache_dir else None
        self.cache_loaded = self.cache_path is not None and self._load_cache()
        # how many quantized weights the file on disk holds (None: no file yet)
        self._weights_on_disk = len(self._weights) if self.cache_loaded else None
        if not self.cache_loaded:
            self.deploy_graph, self.deploy_note = self._read_deploy_graph()
            self._observers, self._input_means, self._out_observers = self._fit_activation_ranges()
            self.reference_outputs = self.task.outputs(self.model)
        self._hooks = [self._install_act_hook(fqn) for fqn in self._observers]
        self._hooks += [self._install_bias_hook(fqn) for fqn in self._input_means]
        self._hooks += [self._install_out_hook(name) for name in self._out_observers]

    # -- one-time work -------------------------------------------------------------------
    def _read_deploy_graph(self) -> tuple[DeployGraph | None, str]:
        """The deploy graph of the model (hw_models.graph), or None and why not."""
        try:
            graph = read_graph(self.fp32_onnx, self.model, self.task.example_input, self.handles,
                               self.analysis.fqns)
        except MpsearchError as e:
            note = f"{e}"
        except Exception as e:  # noqa: BLE001 - an export failure leaves input-only simulation
            note = f"{type(e).__name__}: {e}"
        else:
            return graph, graph.note
        print(f"mpsearch: warning: the model cannot be exported to ONNX ({note}); each layer's input is "
              "quantized alone and the model cannot be deployed", file=sys.stderr)
        return None, note

    @property
    def fp32_onnx(self):
        """The FP32 ONNX export of the evaluator's model (batch norms folded), made once."""
        if self._fp32_onnx is None:
            self._fp32_onnx = export_fp32(self.model, self.task.example_input,
                                          dynamic_dims="batch" if fixed_sizes(self.task) else "all")
        return self._fp32_onnx

    @property
    def fp32_layout(self) -> dict:
        """What every deployed graph of this model shares, read once from `fp32_onnx`: tensor ->
        channels (dimension 1) and layer -> its nodes in the graph (mpsearch.scoring.onnx_graph; read by
        mpsearch.deploy.build)."""
        if self._fp32_layout is None:
            self._fp32_layout = read_layout(self.fp32_onnx, self.model, self.analysis.fqns)
        return self._fp32_layout

    def plan(self, candidate: Candidate) -> Plan:
        """The tensors the deployed graph of `candidate` quantizes (memoized)."""
        plan = self._plans.get(candidate)
        if plan is None:
            choices = dict(candidate.items())
            if self.deploy_graph is not None:
                plan = self.deploy_graph.plan(choices)
            else:
                edges = {f: c.activation for f, c in choices.items() if c.activation != Precision.FP32}
                plan = Plan(frozenset(), {}, edges)
            self._plans[candidate] = plan
        return plan

    def out_params(self, module: str) -> ActQuantParams:
        """The int8 quantizer of a module's output (a hook point of the deploy graph)."""
        key = (f"out:{module}", Precision.INT8)
        if key not in self._act_params:
            obs = self._out_observers.get(module)
            if obs is None:
                raise EvaluationError(f"module {module!r}: its output is not observed")
            self._act_params[key] = obs.params(Precision.INT8, method=self.settings.act_range,
                                               percentile=self.settings.act_percentile)
        return self._act_params[key]

    def point_params(self, point: Point) -> ActQuantParams:
        """The int8 quantizer of a quantized tensor of the deploy graph."""
        if point.kind == "in":
            return self.act_params(point.names[0], Precision.INT8)
        return self.out_params(point.names[0])

    def _fit_activation_ranges(
        self,
    ) -> tuple[dict[str, HistogramObserver], dict[str, torch.Tensor], dict[str, HistogramObserver]]:
        """Observe each layer's input on the calibration batches: range (and histogram when the
        range method needs one) and, for bias correction, its mean per input channel; and the
        output of every module the deploy graph may quantize."""
        observers: dict[str, HistogramObserver] = {}
        sums: dict[str, list] = {}
        hooks = []
        out_observers: dict[str, HistogramObserver] = {}
        modules = dict(self.model.named_modules())
        out_names = sorted({p.names[0] for p in self.deploy_graph.points.values() if p.kind == "out"}
                           if self.deploy_graph is not None else ())
        for name in out_names:
            obs = out_observers[name] = HistogramObserver()

            def observe_out(module, args, out, obs=obs, name=name):
                if not torch.isfinite(out).all():
                    raise EvaluationError(f"non-finite output of module {name}")
                obs.observe(out)

            hooks.append(modules[name].register_forward_hook(observe_out))
        for fqn, h in self.handles.items():
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

            hooks.append(pre_hook(h.input_module, _inputs(h), observe))
        passes = 2 if self.settings.act_range != "minmax" else 1
        try:
            with torch.no_grad():
                for p in range(passes):
                    if p == 1:
                        for obs in [*observers.values(), *out_observers.values()]:
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
        return ({fqn: obs for fqn, obs in observers.items() if obs.seen}, means,
                {name: obs for name, obs in out_observers.items() if obs.seen})

    def _install_act_hook(self, fqn: str):
        h = self.handles[fqn]

        def fake_quant(x, fqn=fqn):
            params = self._active.get(fqn)
            return x if params is None else params.fake_quant(x)

        return pre_hook(h.input_module, _inputs(h), fake_quant)

    def _install_out_hook(self, name: str):
        def fake_quant(module, args, out, name=name):
            params = self._active_out.get(name)
            return out if params is None else params.fake_quant(out)

        return dict(self.model.named_modules())[name].register_forward_hook(fake_quant)

    def _install_bias_hook(self, fqn: str):
        def correct(module, args, output, fqn=fqn):
            delta = self._active_delta.get(fqn)
            return output if delta is None else output - delta

        return self.handles[fqn].module.register_forward_hook(correct)

    def weight(self, fqn: str, precision: Precision) -> torch.Tensor:
        """The fake-quantized weight of a layer (cached; same memory format as the FP32 one)."""
        key = (fqn, precision)
        w = self._weights.get(key)
        if w is None:
            fp32 = self._fp32_weights[fqn]
            s = self.settings
            group_size = s.group_size if fp32.dim() == 2 else None
            if not precision.is_int:
                q = quantize_weight(fp32, precision, granularity=s.weight_granularity, group_size=group_size)
            else:
                scale = weight_qparams(
                    fp32,
                    precision.bits,
                    granularity=s.weight_granularity,
                    clipping=resolve_clipping(s.weight_clipping, precision.bits),
                    group_size=group_size,
                )
                if self._adarounds(fqn, precision):
                    q = adaround_weight(
                        self.handles[fqn].module, fp32, scale, precision.bits, self._layer_inputs(fqn)
                    )
                else:
                    q = fake_quant_weight(fp32, scale, precision.bits)
            w = self._weights[key] = torch.empty_like(fp32).copy_(q)
        return w

    def _adarounds(self, fqn: str, precision: Precision) -> bool:
        return (
            self.settings.weight_rounding == "adaround"
            and precision.is_int
            and precision.bits <= ADAROUND_MAX_BITS
            and _channel_dim(self.handles[fqn]) is not None
        )

    def _layer_inputs(self, fqn: str) -> torch.Tensor:
        """The FP32 model's input to a layer on the first ADAROUND_SAMPLES calibration samples
        (the forward pass stops at the layer)."""
        h = self.handles[fqn]
        captured: list[torch.Tensor] = []

        def capture(x):
            captured.append(x.detach())
            raise _Captured

        hook = pre_hook(h.input_module, (h.input_arg,), capture)
        n = 0
        try:
            with torch.no_grad():
                for batch in self.task.calib_batches:
                    try:
                        run_model(self.model, batch)
                    except _Captured:
                        n += captured[-1].shape[0]
                    if n >= ADAROUND_SAMPLES:
                        break
        finally:
            hook.remove()
        if not captured:
            raise EvaluationError(f"layer {fqn}: its input was never seen on the calibration batches")
        return torch.cat(captured)[:ADAROUND_SAMPLES]

    def precompute_weights(self, precisions, progress: bool = False) -> int:
        """Quantize every layer's weight at each of `precisions` now (with a progress bar when
        asked); returns how many were computed. Useful before a search when the weights are
        expensive (weight_rounding="adaround")."""
        todo = [(f, p) for p in precisions for f in self.handles if (f, p) not in self._weights]
        bar = tqdm(todo, desc="quantizing weights", unit="layer", file=sys.stderr, disable=not progress)
        for fqn, p in bar:
            self.weight(fqn, p)
        return len(todo)

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
                module = self.handles[fqn].module
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
        """`fingerprint()`, the torch version and the CPU kernels torch runs here (its CPU
        capability): the cached numbers depend on all of them (weight scales found by an MSE search,
        activation ranges, reference outputs differ in their last bits from one kernel set to the
        next), so a cache written under other kernels is not read."""
        h = hashlib.sha256(self.fingerprint().encode())
        h.update(torch.__version__.encode())
        h.update(torch.backends.cpu.get_cpu_capability().encode())
        return h.hexdigest()[:24]

    def fingerprint(self) -> str:
        """Hash of the model's parameters and buffers, the data and the quantizer settings: what a
        search's result stands on, whatever machine computes it (result.json's
        settings.evaluator_key; `mpsearch verify` checks it)."""
        if self._fingerprint is not None:
            return self._fingerprint
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
        self._fingerprint = h.hexdigest()[:24]
        return self._fingerprint

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
            "out_observers": {name: obs.state_dict() for name, obs in self._out_observers.items()},
            "deploy_graph": json.dumps(self.deploy_graph.to_dict()) if self.deploy_graph is not None else None,
            "deploy_note": self.deploy_note,
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
            self._out_observers = {n: HistogramObserver.from_state_dict(d) for n, d in state["out_observers"].items()}
            graph = state["deploy_graph"]
            self.deploy_graph = DeployGraph.from_dict(json.loads(graph)) if graph is not None else None
            self.deploy_note = state["deploy_note"]
            for key, w in state["weights"].items():
                fqn, p = key.rsplit("|", 1)
                fp32 = self._fp32_weights[fqn]
                self._weights[(fqn, Precision(p))] = torch.empty_like(fp32).copy_(w)
        except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never fatal
            print(f"mpsearch: warning: evaluator cache {self.cache_path} unusable ({type(e).__name__}); "
                  "rebuilding it", file=sys.stderr)
            self._weights.clear()
            self._out_observers = {}
            self.deploy_graph, self.deploy_note = None, ""
            return False
        return True

    # -- per candidate -------------------------------------------------------------------
    def score(self, candidate: Candidate, stop_below: float | None = None) -> Score:
        """The candidate's metric and proxies over the evaluation batches (memoized).

        stop_below: multi-fidelity scoring. After a quarter and after half of the evaluation
        batches (at least 2), the full metric's upper confidence bound is estimated from the
        per-batch metrics so far: the batches not yet run are taken to score like those seen,
        give or take EARLY_STOP_Z standard errors,
            upper = m_k + (n - k) / n * z * s * sqrt(1/k + 1/(n - k)),
        with m_k the metric on the k batches run, s the standard deviation of their per-batch
        metrics, n the number of batches. When upper < stop_below the candidate cannot reach
        the threshold and is stopped there: the Score has fidelity k / n. A search passes the best
        metric among the trials at least as fast as the candidate, so only candidates that
        would be dominated are stopped.
        """
        cached = self._scores.get(candidate)
        if cached is not None:
            return cached
        partial = self._partial.get(candidate)
        if partial is not None and stop_below is not None and partial.metric_upper < stop_below:
            return partial
        try:
            outputs, upper = self._run(candidate, stop_below)
        except EvaluationError:
            raise
        except (Exception, SystemExit) as e:  # the model cannot run with these weights (a sys.exit in it too)
            raise EvaluationError(f"the model failed under this configuration: {type(e).__name__}: {e}") from e
        k, n = len(outputs), len(self.task.eval_batches)
        metric = self._metric(outputs)
        self.n_evaluations += 1
        self.n_batches_scored += k
        # per-sample KLs once: their mean is the proxy, their spread its interval
        kl = metrics.kl_per_sample(outputs, self.reference_outputs[:k]) if self.task.kind == "classifier" else None
        score = Score(metric, self.proxies(outputs, kl), fidelity=k / n, metric_upper=upper if k < n else None,
                      intervals=self.intervals(outputs, metric, kl))
        if k < n:
            self._partial[candidate] = score
        else:
            self._scores[candidate] = score
        return score

    def _metric(self, outputs: list[torch.Tensor], first: int = 0) -> float:
        """The task metric of outputs of eval_batches[first:first + len(outputs)]."""
        for i, out in enumerate(outputs, first):
            if not torch.isfinite(out).all():
                raise EvaluationError(f"non-finite model output on evaluation batch {i}")
        targets = [t for _, t in self.task.eval_batches[first : first + len(outputs)]]
        try:
            metric = float(self.task.metric_fn(outputs, targets))
        except (Exception, SystemExit) as e:  # a sys.exit() in a task's code is its error, not ours to obey
            raise EvaluationError(
                f"the task metric {self.task.metric_name} raised {type(e).__name__}: {e}"
            ) from e
        if not math.isfinite(metric):
            raise EvaluationError(f"the task metric {self.task.metric_name} is not finite ({metric})")
        return metric

    def outputs(self, candidate: Candidate) -> list[torch.Tensor]:
        """The simulated-quantized model's outputs on the evaluation batches (not memoized)."""
        return self._run(candidate)[0]

    def _run(self, candidate: Candidate, stop_below: float | None = None) -> tuple[list[torch.Tensor], float]:
        """Outputs on the evaluation batches, and the last upper bound checked (inf if none):
        fewer outputs than batches when the candidate was stopped early (see `score`)."""
        handles = self.handles
        batches = self.task.eval_batches
        n = len(batches)
        stops = set() if stop_below is None else {k for f in EARLY_STOP_AT if 2 <= (k := math.ceil(f * n)) < n}
        upper = math.inf
        # everything first (computing a weight may run the FP32 model), then swap it all in
        plan = self.plan(candidate)
        parts = [(fqn, self.weight(fqn, c.weight), self.bias_delta(fqn, c.weight)) for fqn, c in candidate.items()]
        # the plan's quantizers, on layers of the candidate or not (a layer left out is FP32 but
        # may read an int8 tensor)
        acts = {fqn: self.act_params(fqn, p) for fqn, p in plan.sim_inputs.items()}
        outs = {name: self.out_params(name) for name in plan.sim_outputs}
        try:
            for fqn, weight, delta in parts:
                h = handles[fqn]
                getattr(h.module, h.param).data = weight
                if delta is not None:
                    self._active_delta[fqn] = delta
            self._active.update(acts)
            self._active_out.update(outs)
            outputs: list[torch.Tensor] = []
            per_batch: list[float] = []
            with torch.no_grad():
                for i, (inputs, _) in enumerate(batches):
                    outputs.append(run_model(self.model, inputs))
                    if not stops:
                        continue
                    per_batch.append(self._metric(outputs[-1:], i))
                    if len(outputs) in stops:
                        upper = _upper_bound(self._metric(outputs), per_batch, n)
                        if upper < stop_below:
                            break
            return outputs, upper
        finally:
            self.restore()

    def restore(self) -> None:
        """Put the FP32 weights back and turn every activation quantizer off."""
        for fqn, w in self._fp32_weights.items():
            h = self.handles[fqn]
            getattr(h.module, h.param).data = w
        self._active.clear()
        self._active_delta.clear()
        self._active_out.clear()

    def proxies(self, outputs: list[torch.Tensor], kl: torch.Tensor | None = None) -> dict[str, float]:
        """Label-free proxies of outputs of the first len(outputs) evaluation batches (`kl`: their
        per-sample KLs to FP32, when already computed)."""
        ref = self.reference_outputs[: len(outputs)]
        out = {"sqnr_db": metrics.sqnr_db(outputs, ref)}
        if self.task.kind == "classifier":
            out["kl_to_fp32"] = float((metrics.kl_per_sample(outputs, ref) if kl is None else kl).mean())
            out["top1_agreement"] = metrics.top1_agreement(outputs, ref)
        elif self.task.kind == "embedding":
            out["cosine_to_fp32"] = metrics.mean_cosine(outputs, ref)
        return out

    def intervals(self, outputs: list[torch.Tensor], metric: float,
                  kl: torch.Tensor | None = None) -> dict[str, tuple[float, float]]:
        """95% confidence intervals of the metric of outputs of the first len(outputs) evaluation
        batches and of their KL to FP32 (classifiers; `kl`: their per-sample KLs when already
        computed), as mpsearch.metrics' module doc says; a metric that is no share of samples and
        was scored on one batch, or that a single batch cannot score, has none."""
        task, k = self.task, len(outputs)
        out: dict[str, tuple[float, float]] = {}
        n = metrics.n_eval_samples(task.eval_batches[:k])
        if n and 0.0 <= metric <= 1.0 and metrics.is_proportion(task.metric_fn, task.metric_name, task.fp32_metric):
            out["metric"] = metrics.wilson_interval(metric, n)
        elif k > 1:
            try:
                se = metrics.standard_error([self._metric(outputs[i : i + 1], i) for i in range(k)])
            except EvaluationError:
                se = None
            if se is not None:
                out["metric"] = (metric - metrics.Z95 * se, metric + metrics.Z95 * se)
        if task.kind == "classifier":
            if kl is None:
                kl = metrics.kl_per_sample(outputs, self.reference_outputs[:k])
            mean, se = float(kl.mean()), metrics.standard_error(kl.tolist())
            if se is not None:
                out["kl_to_fp32"] = (max(0.0, mean - metrics.Z95 * se), mean + metrics.Z95 * se)
        return out

    def close(self) -> None:
        self.restore()
        for hk in self._hooks:
            hk.remove()
        self._hooks = []


class _Captured(Exception):
    """Stops a forward pass once the input of the layer of interest has been seen."""


def _upper_bound(metric_k: float, per_batch: list[float], n: int) -> float:
    """Upper confidence bound of the metric over n batches from the first k (see Evaluator.score)."""
    k = len(per_batch)
    mean = sum(per_batch) / k
    sd = math.sqrt(sum((m - mean) ** 2 for m in per_batch) / (k - 1))
    return metric_k + (n - k) / n * EARLY_STOP_Z * sd * math.sqrt(1 / k + 1 / (n - k))


def input_pre_hook(h, fn, prepend: bool = False):
    """A forward pre-hook applying fn to a layer's input (every argument its handle names)."""
    return pre_hook(h.input_module, _inputs(h), fn, prepend)


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
