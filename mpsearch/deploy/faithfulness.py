"""Is the simulated quantizer faithful to real int8 kernels?

`compare_int8(task, analysis, evaluator)` runs a candidate (default: uniform W8A8) twice on
every evaluation batch: simulated (the evaluator's fake quantization in FP32 torch) and for real
(its deployed graph, `mpsearch.deploy.build`: the same integers and quantization parameters in
QDQ format, run by ONNX Runtime's int8 kernels), and reports how close the two are.

The deployed numbers are the evaluator's own: weight integers and per-channel scales checked to
reproduce `evaluator.weight(fqn, precision)` exactly, activation parameters from the evaluator's
observers for every tensor the deployed graph quantizes (hw_models.graph). Layers whose
input cannot be intercepted (`handles[fqn].input_module is None`) keep a float input in both.

How close is close? A W8A8 network is discontinuous: every activation quantizer rounds, so a
change of one float32 ulp in a layer's input (a different summation order in another
convolution kernel) moves the values sitting next to a rounding boundary by one step, and
those changes grow through the following layers. The report therefore carries a noise floor:
the simulation against itself with every quantized layer's input multiplied by (1 + 2^-23)
(one or two ulps) before its quantizer. ORT is as faithful as it can be when its differences
from the simulation are at that floor; they are on digits and MobileNetV2 (whose floor is
large: ~0.3 mean absolute logit difference, against ~0.4 between W8A8 and FP32).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

import torch

from hw_models import Candidate, LayerChoice, Precision
from mpsearch import metrics
from mpsearch.onnx_export import OrtRunner
from mpsearch.scoring.analysis import ModelAnalysis
from mpsearch.scoring.evaluator import Evaluator, input_pre_hook
from mpsearch.tasks.base import Task

__all__ = ["FaithfulnessReport", "compare_int8", "int8_candidate"]

WEIGHT_QUANTIZER = "int8 per-channel symmetric min-max (mpsearch.scoring.quant.weight_qparams)"


@dataclass(frozen=True)
class FaithfulnessReport:
    """Simulated W8A8 against ONNX Runtime int8 on a task's evaluation batches.

    agreement: top-1 agreement between the two (classifiers) or their mean cosine similarity
    (other tasks); `agreement_kind` says which. max_abs_diff / mean_abs_diff: between the two
    outputs; output_scale: max |FP32 output|, for scale. int8_kernels: int8 convolution /
    matrix-multiply nodes in ORT's optimized graph, against n_layers quantized layers
    (n_act_quantized of them with an int8 input). ort_ops: the optimized graph's op counts.
    floor_*: the same figures between the simulation and itself with every quantizer's input
    moved by one or two float32 ulps (see the module doc); NaN when not computed.
    Latencies: one evaluation batch (latency_batch_size samples), ORT FP32 and int8 sessions
    with the same threads, median of latency_runs runs after a warm-up.
    """

    task: str
    metric_name: str
    n_samples: int
    n_layers: int
    n_act_quantized: int
    agreement_kind: str
    agreement: float
    max_abs_diff: float
    mean_abs_diff: float
    output_scale: float
    fp32_metric: float
    sim_metric: float
    ort_metric: float
    sim_agreement_with_fp32: float
    ort_agreement_with_fp32: float
    floor_agreement: float
    floor_max_abs_diff: float
    floor_mean_abs_diff: float
    int8_kernels: int
    ort_ops: tuple[tuple[str, int], ...]
    latency_fp32_ms: float
    latency_int8_ms: float
    latency_batch_size: int
    latency_runs: int
    threads: int | None
    weight_quantizer: str = WEIGHT_QUANTIZER
    weight_dtype: str = "int8"

    @property
    def rel_max_diff(self) -> float:
        """max_abs_diff / output_scale."""
        return self.max_abs_diff / self.output_scale if self.output_scale > 0 else float("inf")

    @property
    def int8_speedup(self) -> float:
        return self.latency_fp32_ms / self.latency_int8_ms if self.latency_int8_ms > 0 else float("nan")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ort_ops"] = dict(self.ort_ops)
        d["rel_max_diff"] = self.rel_max_diff
        d["int8_speedup"] = self.int8_speedup
        return d


def int8_candidate(analysis: ModelAnalysis) -> Candidate:
    """Uniform W8A8, with a float (FP32) input for layers whose input cannot be intercepted."""
    return Candidate(
        (fqn, LayerChoice(Precision.INT8, Precision.INT8 if analysis.handles[fqn].input_module is not None
                          else Precision.FP32))
        for fqn in analysis.fqns
    )


ULP_FACTOR = 1.0 + 2.0**-23  # the next float32 after 1


def _nudge(x: torch.Tensor) -> torch.Tensor:
    return x * ULP_FACTOR if x.is_floating_point() else x


def _perturbed_outputs(evaluator: Evaluator, analysis: ModelAnalysis, candidate: Candidate) -> list[torch.Tensor]:
    """The simulated outputs with every quantizer's input (layer inputs and module outputs the
    deployed graph quantizes) moved by one or two ulps first."""
    hooks = []
    plan = evaluator.plan(candidate)
    modules = dict(evaluator.model.named_modules())
    try:
        for fqn in plan.sim_inputs:
            h = evaluator.handles[fqn]
            if h.input_module is not None:
                hooks.append(input_pre_hook(h, _nudge, prepend=True))
        for name in plan.sim_outputs:
            hooks.append(modules[name].register_forward_hook(lambda m, a, out: _nudge(out), prepend=True))
        return evaluator.outputs(candidate)
    finally:
        for hk in hooks:
            hk.remove()


def _diffs(a: list[torch.Tensor], b: list[torch.Tensor]) -> tuple[float, float]:
    """(max, mean) absolute difference."""
    d = [(x.to(torch.float32) - y.to(torch.float32)).abs() for x, y in zip(a, b)]
    return max(float(x.max()) for x in d), sum(float(x.sum()) for x in d) / sum(x.numel() for x in d)


def _agreement(kind: str, outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    if kind == "classifier":
        return metrics.top1_agreement(outputs, reference)
    return metrics.mean_cosine(outputs, reference)


def compare_int8(
    task: Task,
    analysis: ModelAnalysis,
    evaluator: Evaluator,
    *,
    candidate: Candidate | None = None,
    threads: int | None = 1,
    latency_runs: int = 5,
    weight_dtype: str = "auto",
    noise_floor: bool = True,
) -> FaithfulnessReport:
    """Simulated against ONNX Runtime int8 kernels on every evaluation batch (see module doc).

    candidate: the configuration (default: uniform W8A8, `int8_candidate`). threads: ORT
    intra-op threads of both sessions; latency_runs: timed runs per session (on the first
    evaluation batch, interleaved); weight_dtype: "auto" (see
    `mpsearch.onnx_export.default_weight_dtype`), "int8" or "uint8"; noise_floor: also run the
    simulation once more with its quantizer inputs moved by an ulp (the floor_* figures).
    """
    from mpsearch.deploy.build import build

    candidate = candidate if candidate is not None else int8_candidate(analysis)
    deployment = build(evaluator, candidate, weight_dtype=weight_dtype)
    sim = evaluator.outputs(candidate)
    weight_dtype = deployment.weight_dtype
    int8 = OrtRunner(deployment.proto, threads=threads)
    fp32 = OrtRunner(evaluator.fp32_onnx, threads=threads)
    ort = [int8.run(inputs) for inputs, _ in task.eval_batches]
    plan = deployment.plan
    n_layers = sum(1 for c in candidate.values() if c.weight.is_int)
    n_act = len(plan.sim_inputs)

    ref = evaluator.reference_outputs
    max_diff, mean_diff = _diffs(ort, sim)
    nan = float("nan")
    floor_agreement = floor_max = floor_mean = nan
    if noise_floor:
        nudged = _perturbed_outputs(evaluator, analysis, candidate)
        floor_agreement = _agreement(task.kind, nudged, sim)
        floor_max, floor_mean = _diffs(nudged, sim)
    n_samples = sum(int(o.shape[0]) for o in ort)
    agreement_kind = "top1" if task.kind == "classifier" else "cosine"

    batch = task.eval_batches[0][0]
    t_fp32: list[float] = []
    t_int8: list[float] = []
    for i in range(latency_runs):  # interleaved, so that drift hits both alike
        t_fp32 += fp32.time_batch(batch, repeats=1, warmup=i == 0)
        t_int8 += int8.time_batch(batch, repeats=1, warmup=i == 0)
    first = batch[0] if isinstance(batch, tuple) else batch

    return FaithfulnessReport(
        task=task.name,
        metric_name=task.metric_name,
        n_samples=n_samples,
        n_layers=n_layers,
        n_act_quantized=n_act,
        agreement_kind=agreement_kind,
        agreement=_agreement(task.kind, ort, sim),
        max_abs_diff=max_diff,
        mean_abs_diff=mean_diff,
        output_scale=max(float(r.abs().max()) for r in ref),
        fp32_metric=float(task.fp32_metric),
        sim_metric=task.score_outputs(sim),
        ort_metric=task.score_outputs(ort),
        sim_agreement_with_fp32=_agreement(task.kind, sim, ref),
        ort_agreement_with_fp32=_agreement(task.kind, ort, ref),
        floor_agreement=floor_agreement,
        floor_max_abs_diff=floor_max,
        floor_mean_abs_diff=floor_mean,
        int8_kernels=int8.int8_kernels,
        ort_ops=tuple(int8.op_counts.items()),
        latency_fp32_ms=1e3 * statistics.median(t_fp32),
        latency_int8_ms=1e3 * statistics.median(t_int8),
        latency_batch_size=int(first.shape[0]),
        latency_runs=latency_runs,
        threads=threads,
        weight_dtype=weight_dtype,
    )
