"""Export a searched configuration, and apply it to a model (simulated or as ONNX QDQ).

A configuration file (schema "mpsearch.config/1") is the per-layer precision map of one trial
of a finished search, made by `export_config` from DIR/result.json:

    {
     "schema": "mpsearch.config/1",
     "task": "digits",
     "target": "x86-vnni",
     "trial": 5,
     "metric": 0.9861,
     "metric_name": "accuracy",
     "latency_ms": 0.042,
     "weight_bytes": 9876,
     "quant": {"weight_granularity": "per_channel", "weight_clipping": "auto", ...},
     "layers": {
      "features.0": {"weight": "fp32", "activation": "fp32"},
      "features.2": {"weight": "int6", "activation": "int8"},
      ...
     }
    }

Keys:

- schema: the string "mpsearch.config/1" (CONFIG_SCHEMA). Required. A reader refuses any other
  value; a change to the meaning of a key gets a new version.
- layers: required, non-empty. Layer name (the module's fully qualified name in the FP32
  model, as `mpsearch.scoring.analysis.analyze` lists the quantizable layers) -> {"weight": precision,
  "activation": precision}, in the model's execution order. Precisions are `hw_models.Precision`
  names: int2, int3, int4, int6, int8, int16, fp8_e4m3, fp16, bf16, fp32. "weight" is the
  layer's weight format (integers: symmetric, per output channel unless quant says otherwise),
  "activation" the format of the layer's input (integers: per tensor, asymmetric unsigned).
  Every quantizable layer of the model must be listed, and nothing else.
- quant: the quantizer settings the search scored with (`mpsearch.scoring.evaluator.QuantSettings`
  as a dict: weight_granularity, weight_clipping, group_size, act_range, act_percentile,
  bias_correction, fold_batchnorm, weight_rounding), or null for the defaults. Applying the
  configuration with the same settings and calibration data reproduces what the search scored.
- task, target: the task reference and the hardware target name of the search.
- trial: the trial number in result.json.
- metric, metric_name: the task metric the search measured for this configuration (simulated
  quantization, on the task's evaluation batches) and its name ("accuracy", ...).
- latency_ms, weight_bytes: the target cost model's latency and weight memory of the
  configuration, as recorded in the trial.

Only "schema" and "layers" (and "quant" when present) are checked by `read_config`; the other
keys describe where the configuration came from. Hand-written configurations need only
"schema" and "layers".

Functions:

- `export_config(result, trial=None)`: the configuration of trial `trial` (default: the
  search's best) of DIR/result.json, as a dict; `write_config(config, path)` writes it
  atomically; `read_config(path_or_dict)` reads and validates one.
- `apply(model, config, calib_batches=None, quant=None, example_input=None)`: a new,
  simulated-quantized copy of the model (the evaluator's own fake quantization, hooks included),
  computing what the search scored; `apply_task(task, config)` does it for a Task with the
  task's calibration batches and the config's quant settings.
- `export_onnx(task, config, path)`: the configuration's deployed graph as an ONNX model in QDQ
  format (`mpsearch.deploy.build`), with the evaluator's integers and quantization parameters.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from hw_models import Candidate, LayerChoice, Precision
from mpsearch.cache import atomic_write_bytes
from mpsearch.errors import EvaluationError, InvalidConfigError
from mpsearch.onnx_export import import_onnx
from mpsearch.results.records import SearchResult, dumps_strict
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator, QuantSettings, input_pre_hook
from mpsearch.tasks import load_task
from mpsearch.tasks.base import Batch, Task

if TYPE_CHECKING:  # pragma: no cover
    import onnx

__all__ = [
    "CONFIG_SCHEMA",
    "apply",
    "apply_task",
    "export_config",
    "export_onnx",
    "read_config",
    "write_config",
]

CONFIG_SCHEMA = "mpsearch.config/1"
_INLINE = "<config>"  # how errors name a configuration given as a dict


# -- configuration files --------------------------------------------------------------------
def export_config(result: str | Path, trial: int | None = None) -> dict[str, Any]:
    """The configuration of trial `trial` of a finished search (module doc: the keys).

    result: the search's output directory (its result.json is read) or the result.json path.
    trial: a trial number; None: the search's best trial (`SearchResult.best`: the fastest within
    its drop budget, see mpsearch.results.selection). Raises InvalidConfigError when result.json cannot be read, when there is
    no such trial, or when the trial is not complete (its state and reason are named).
    """
    path = Path(result)
    if path.is_dir():
        path = path / "result.json"
    res = SearchResult.read(path)
    if trial is None:
        trial = res.best
        if trial is None:
            raise InvalidConfigError(f"{path}: the search has no complete, feasible trial to export")
    try:
        record = res.trial(trial)
    except KeyError:
        numbers = [t.number for t in res.trials]
        known = f"trials {min(numbers)}..{max(numbers)}" if numbers else "no trials"
        raise InvalidConfigError(f"{path}: there is no trial {trial} (the search has {known})") from None
    if record.state != "complete":
        why = f": {record.reason}" if record.reason else ""
        raise InvalidConfigError(f"{path}: trial {trial} is {record.state}, not complete{why}")
    return {
        "schema": CONFIG_SCHEMA,
        "task": res.task,
        "target": res.target,
        "trial": record.number,
        "metric": record.metric,
        "metric_name": res.reference.get("metric_name"),
        "latency_ms": record.latency_ms,
        "weight_bytes": record.weight_bytes,
        "quant": res.settings.get("quant"),
        "layers": record.config.to_dict(),
    }


def write_config(config: Mapping[str, Any], path: str | Path) -> None:
    """Validate `config` (read_config) and write it to `path` as JSON, atomically."""
    checked = read_config(config)
    atomic_write_bytes(path, (dumps_strict(checked, indent=1) + "\n").encode())


def read_config(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A configuration (a JSON file or an already loaded dict), validated; returns a new dict
    with the precision names normalized ("INT4" -> "int4").

    Raises InvalidConfigError naming the file (or "<config>" for a dict) and what is wrong:
    unreadable JSON, a missing or different schema, missing or empty "layers", the first layer
    whose entry is not {"weight": precision, "activation": precision} or names an unknown
    precision, a "quant" that is not null or valid QuantSettings fields.
    """
    if isinstance(source, Mapping):
        name, data = _INLINE, source
    else:
        name = str(source)
        try:
            data = json.loads(Path(source).read_text())
        except OSError as e:
            raise InvalidConfigError(f"{name}: cannot read the configuration ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise InvalidConfigError(f"{name}: not JSON ({e})") from None
    if not isinstance(data, Mapping):
        raise InvalidConfigError(f"{name}: a configuration is a JSON object, found {type(data).__name__}")
    schema = data.get("schema")
    if schema != CONFIG_SCHEMA:
        found = "no schema" if "schema" not in data else f"schema {schema!r}"
        raise InvalidConfigError(f"{name}: expected schema {CONFIG_SCHEMA!r}, found {found}")
    layers = data.get("layers")
    if not isinstance(layers, Mapping) or not layers:
        raise InvalidConfigError(f"{name}: \"layers\" must be a non-empty object of layer name -> "
                                 "{\"weight\": precision, \"activation\": precision}")
    out = dict(data)
    out["layers"] = {fqn: _layer_entry(name, fqn, entry) for fqn, entry in layers.items()}
    _quant_settings(name, out.get("quant"))  # checked here, built where used
    return out


def _layer_entry(name: str, fqn: str, entry: Any) -> dict[str, str]:
    if not isinstance(entry, Mapping) or not {"weight", "activation"} <= set(entry):
        raise InvalidConfigError(f"{name}: layer {fqn!r}: expected {{\"weight\": precision, "
                                 f"\"activation\": precision}}, found {entry!r}")
    out = {}
    for key in ("weight", "activation"):
        value = entry[key]
        if not isinstance(value, str):
            raise InvalidConfigError(f"{name}: layer {fqn!r}: {key}: a precision name is a string, found {value!r}")
        try:
            out[key] = Precision.parse(value).value
        except ValueError as e:
            raise InvalidConfigError(f"{name}: layer {fqn!r}: {key}: {e}") from None
    return out


def _quant_settings(name: str, quant: Any) -> QuantSettings:
    if quant is None:
        return QuantSettings()
    if isinstance(quant, QuantSettings):
        return quant
    if not isinstance(quant, Mapping):
        raise InvalidConfigError(f"{name}: \"quant\" must be null or an object of QuantSettings fields, "
                                 f"found {type(quant).__name__}")
    try:
        return QuantSettings(**quant)
    except (TypeError, InvalidConfigError) as e:  # an unknown field, a value out of range
        raise InvalidConfigError(f"{name}: \"quant\": {e}") from None


def _source_name(config: str | Path | Mapping[str, Any]) -> str:
    return _INLINE if isinstance(config, Mapping) else str(config)


# -- the evaluator's quantization of a configuration -----------------------------------------
class _Prepared:
    """An Evaluator on a private copy of a model, with everything a configuration needs from it
    computed (quantized weights, the activation quantizers of the tensors its deployed graph
    quantizes, bias corrections)."""

    def __init__(
        self,
        model: nn.Module,
        config: str | Path | Mapping[str, Any],
        calib_batches: Sequence[Batch] | None,
        quant: QuantSettings | Mapping[str, Any] | None,
        example_input: Batch | None,
    ):
        self.name = name = _source_name(config)
        self.config = cfg = read_config(config)
        settings = _quant_settings(name, cfg.get("quant") if quant is None else quant)
        calib = list(calib_batches) if calib_batches is not None else None
        if calib is not None and not calib:
            raise InvalidConfigError("calib_batches is empty (None quantizes the weights only)")
        example = example_input if example_input is not None else (calib[0] if calib else None)
        if example is None:
            raise InvalidConfigError("apply needs calib_batches, or an example_input to find the layers by")
        if calib is None and settings.weight_rounding == "adaround":
            raise InvalidConfigError("weight_rounding 'adaround' needs calib_batches")
        self.calibrated = calib is not None
        private = copy.deepcopy(model).eval()  # eval mode, the caller's model left as it is
        analysis = analyze(private, example)
        self.candidate = _candidate(name, cfg["layers"], analysis.fqns)
        task = Task(name="mpsearch.export", model=private, calib_batches=calib or [example],
                    eval_batches=[(example, None)], metric_name="none", metric_fn=_no_metric,
                    fp32_metric=0.0, kind="other")
        self.task = task
        self.evaluator = ev = Evaluator(task, analysis, settings)
        try:
            plan = ev.plan(self.candidate)
            inputs = plan.sim_inputs if self.calibrated else {}
            self.parts = {fqn: self._part(name, fqn, c, inputs.get(fqn, Precision.FP32))
                          for fqn, c in self.candidate.items()}
            self.outputs = {m: ev.out_params(m) for m in plan.sim_outputs} if self.calibrated else {}
        finally:
            ev.close()  # FP32 weights back, its hooks removed: the model is ours
        self.model = ev.model

    def _part(self, name: str, fqn: str, choice: LayerChoice, act: Precision):
        """(quantized weight, input quantizer or None, bias correction or None) of a layer."""
        ev = self.evaluator
        try:
            weight = ev.weight(fqn, choice.weight)
            if not self.calibrated:
                return weight, None, None
            return weight, ev.act_params(fqn, act), ev.bias_delta(fqn, choice.weight)
        except (ValueError, EvaluationError) as e:
            raise InvalidConfigError(f"{name}: layer {fqn!r} ({choice.weight}/{choice.activation}): {e}") \
                from None


def _no_metric(outputs: Sequence[torch.Tensor], targets: Sequence[Any]) -> float:
    return 0.0


def _candidate(name: str, layers: Mapping[str, Mapping[str, str]], fqns: Sequence[str]) -> Candidate:
    """The configuration as a Candidate in the model's layer order; refuses the first layer of the
    configuration the model does not have, then the first model layer the configuration lacks."""
    known = set(fqns)
    for fqn in layers:
        if fqn not in known:
            raise InvalidConfigError(f"{name}: layer {fqn!r} is not a quantizable layer of the model "
                                     f"(its layers: {', '.join(fqns)})")
    for fqn in fqns:
        if fqn not in layers:
            raise InvalidConfigError(f"{name}: the model's layer {fqn!r} is missing from the configuration")
    return Candidate((fqn, LayerChoice(Precision(layers[fqn]["weight"]), Precision(layers[fqn]["activation"])))
                     for fqn in fqns)


# -- simulated quantization -------------------------------------------------------------------
def apply(
    model: nn.Module,
    config: str | Path | Mapping[str, Any],
    calib_batches: Sequence[Batch] | None = None,
    quant: QuantSettings | Mapping[str, Any] | None = None,
    *,
    example_input: Batch | None = None,
) -> nn.Module:
    """A new copy of `model` quantized (simulated, in FP32) as `config` says; `model` is untouched.

    The copy computes what the search scored: the weights are the evaluator's quantized ones
    (`mpsearch.scoring.evaluator.Evaluator.weight`); every tensor the configuration's deployed graph
    quantizes (hw_models.graph: int8 layers' inputs and convolution outputs, residual Adds
    and poolings between int8 tensors) goes through a forward pre-hook on the layers reading it
    or a forward hook on the module returning it, fake-quantizing it with the evaluator's
    activation parameters, computed from the ranges observed on `calib_batches` on the FP32
    model; and a forward hook subtracts the evaluator's bias correction where
    QuantSettings.bias_correction asks for one.

    config: a configuration dict or file (read_config); its layers must be exactly the model's
    quantizable layers (else InvalidConfigError naming the first mismatch).
    calib_batches: model inputs to calibrate the activation quantizers and bias corrections on
    (the task's calibration batches reproduce the search). None: only the weights are quantized;
    every activation stays FP32 and no bias correction is applied (it needs the layers' mean
    inputs); `example_input` is then required to find the layers.
    quant: quantizer settings (QuantSettings or its dict); None: the config's "quant", else the
    defaults.

    The returned model is the evaluator's: with QuantSettings.fold_batchnorm (the default),
    batch norms that follow a convolution are folded into it and replaced by nn.Identity, and a
    model with 2-D convolutions is in channels-last memory format. It is in eval mode; the
    quantization lives in its weights and hooks (copying it with copy.deepcopy keeps them).
    """
    prepared = _Prepared(model, config, calib_batches, quant, example_input)
    out = prepared.model
    for fqn, (weight, act, delta) in prepared.parts.items():
        h = prepared.evaluator.handles[fqn]
        getattr(h.module, h.param).data = weight
        if act is not None:
            input_pre_hook(h, act.fake_quant)
        if delta is not None:
            h.module.register_forward_hook(_subtract(delta))
    modules = dict(out.named_modules())
    for name, params in prepared.outputs.items():  # after the bias corrections, as the evaluator
        modules[name].register_forward_hook(_quantize_output(params))
    return out


def _quantize_output(params):
    """A forward hook fake-quantizing a module's output (a tensor the deployed graph quantizes)."""

    def quantize(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return params.fake_quant(output)

    return quantize


def _subtract(delta: torch.Tensor):
    """A forward hook subtracting the bias correction from a layer's output (as the evaluator)."""

    def correct(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output - delta

    return correct


def apply_task(task: Task | str, config: str | Path | Mapping[str, Any]) -> nn.Module:
    """`apply` to a task's model with its calibration batches and the config's quant settings:
    `task.evaluate(apply_task(task, export_config(dir, n)))` is trial n's metric.
    task: a Task or a task reference (`mpsearch.tasks.load_task`)."""
    task = _load(task)
    return apply(task.model, config, task.calib_batches)


def _load(task: Task | str) -> Task:
    return load_task(task) if isinstance(task, str) else task


# -- ONNX -------------------------------------------------------------------------------------
def export_onnx(
    task: Task | str,
    config: str | Path | Mapping[str, Any],
    path: str | Path | None = None,
    weight_dtype: str = "auto",
    *,
    int4: bool = True,
) -> onnx.ModelProto:
    """The configuration's deployed graph as an ONNX model in QDQ format; written to `path` when
    given.

    The graph is `mpsearch.deploy.build`'s, the one `mpsearch calibrate` times and `mpsearch
    verify` measures, with the numbers `apply_task(task, config)` simulates: the evaluator's
    integer weights and per-channel scales, its activation quantizers on every tensor the
    deployed graph quantizes (int8 layers' inputs and convolution outputs, residual Adds and
    poolings between int8 tensors), bias corrections added into the biases. int4: weights of 4
    bits and fewer are stored as INT4 (opset 21) and widened to int8 when ONNX Runtime loads the
    model, so they run on int8 kernels; int4=False stores them in 8 bits. The ONNX model's
    metadata "mpsearch.config" holds the configuration (JSON) and "mpsearch.runtime" how each
    weight is stored and, per layer, what runs where it is not what the configuration asks.

    Refused with InvalidConfigError: an activation other than int8 or fp32, an int16 weight,
    group-wise weight scales (QuantSettings.group_size) on a Linear layer, a layer the exported
    graph does not show. MissingDependencyError without onnx.
    """
    from mpsearch.deploy.build import build

    onnx, _ = import_onnx()
    task = _load(task)
    prepared = _Prepared(task.model, config, task.calib_batches, None, None)
    try:
        deployment = build(prepared.evaluator, prepared.candidate, weight_dtype=weight_dtype, int4_storage=int4)
    except (InvalidConfigError, ValueError) as e:
        raise InvalidConfigError(f"{prepared.name}: cannot export to ONNX: {e}") from None
    proto = deployment.proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = "mpsearch.config", dumps_strict(prepared.config)
    if path is not None:
        onnx.save(proto, str(path))
    return proto
