"""The deployed QDQ graph in ONNX Runtime against the simulated quantizer."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from hw_models import Candidate, LayerChoice, Precision
from mpsearch.deploy.build import build, weight_ints
from mpsearch.errors import InvalidConfigError, MissingDependencyError
from mpsearch.metrics import accuracy
from mpsearch.onnx_export import OrtRunner, count_int8_kernels, default_weight_dtype, export_fp32
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator, QuantSettings
from mpsearch.tasks import Task

W8A8 = LayerChoice(Precision.INT8, Precision.INT8)
# ORT kernels for these weight formats are correct on every CPU (u8 weights: no int16 saturation
# on x86 without VNNI); "int8" is checked through ORT's reference (unoptimized) graph.
PORTABLE = "uint8"


class Tiny(nn.Module):
    """Conv -> (BatchNorm) -> ReLU -> Flatten -> Linear."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


def _tiny_case(bn: bool = False, fold: bool = True, seed: int = 0):
    """A tiny task and its evaluator; with bn and fold=False the evaluator keeps the batch norm and
    the ONNX exporter folds it into the convolution (weights k_c * w_c, k_c < 0 for two channels)."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Tiny(bn).eval()
    if bn:  # a negative gamma flips the sign of a folded channel
        model.bn.weight.data = torch.tensor([1.5, -0.7, 0.3, -1.0])
        model.bn.bias.data = torch.tensor([0.1, -0.2, 0.05, 0.3])
        model.bn.running_mean.data = torch.tensor([0.2, -0.1, 0.0, 0.4])
        model.bn.running_var.data = torch.tensor([1.0, 2.0, 1.0, 0.5])
    xs = [torch.randn(16, 2, 5, 5, generator=g) for _ in range(3)]
    task = Task(name="tiny", model=model, calib_batches=xs[:2], eval_batches=[(xs[2], torch.zeros(16, dtype=torch.long))],
                metric_name="accuracy", metric_fn=accuracy, kind="classifier")
    analysis = analyze(model, xs[0])
    ev = Evaluator(task, analysis, QuantSettings(fold_batchnorm=fold))
    return task, analysis, ev, xs[2]


def _one_step_bound(ev: Evaluator, x: torch.Tensor, flips: int = 2) -> torch.Tensor:
    """Per output: `flips` inputs of fc one activation step off, plus the int32 bias rounding. A
    convolution output within float rounding of a quantization boundary lands on either side of
    it depending on the summation order (ORT's kernels against torch's): with the model seeded 0..29
    at most two of fc's 100 inputs of one sample do (seed 18), most often none."""
    step = ev.act_params("fc", Precision.INT8).scale
    w = ev.weight("fc", Precision.INT8).abs()
    return flips * step * w.amax(1) + 0.5 * step * w.amax(1) / 127 + 1e-4


@pytest.mark.parametrize("bn,fold", [(False, True), (True, True), (True, False)],
                         ids=["conv", "conv+batchnorm", "batchnorm-folded-by-the-exporter"])
def test_tiny_model_ort_matches_simulation_within_one_step(bn, fold):
    task, _analysis, ev, x = _tiny_case(bn, fold)
    cand = Candidate({"conv": W8A8, "fc": W8A8})
    with torch.no_grad():
        fp32_before = task.model(x)
    dep = build(ev, cand, weight_dtype=PORTABLE)
    with torch.no_grad():
        assert torch.equal(task.model(x), fp32_before)  # the task's model is left alone
    # the plan: conv's input (graph input) on its own edge, its ReLU output quantized where it is
    # produced and read by fc through the Flatten
    assert dict(dep.plan.edges) == {"conv": Precision.INT8}
    assert [p.names for p in dep.plan.tensors.values()] == [("fc",)]
    ops = [n.op_type for n in dep.proto.graph.node]
    # Q: conv's input, the ReLU output, and again right before fc (after the Flatten: the same grid)
    assert ops.count("QuantizeLinear") == 3
    assert ops.count("DequantizeLinear") == 3 + 2 + 2  # activations, weights, int32 biases
    expected = ev.outputs(cand)[0]
    bound = _one_step_bound(ev, x)
    for optimize in (False, True):
        runner = OrtRunner(dep.proto, optimize=optimize)
        out = runner.run(x)
        assert out.shape == expected.shape
        assert bool(((out - expected).abs() <= bound).all()), (optimize, (out - expected).abs().max())
        assert float((out - expected).abs().median()) < 1e-3
    assert runner.int8_kernels == 2, runner.op_counts  # QLinearConv + QGemm
    assert count_int8_kernels(runner.optimized_model) == 2
    assert runner.op_counts.get("Relu", 0) == 0  # fused into the quantized output


def test_int8_weights_reference_semantics():
    _task, _analysis, ev, x = _tiny_case()
    cand = Candidate({"conv": W8A8, "fc": W8A8})
    dep = build(ev, cand, weight_dtype="int8")
    proto = dep.proto
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert len(dqs) == 2
    inits = {t.name: t for t in proto.graph.initializer}
    assert all(inits[n.input[0]].data_type == 3 for n in dqs)  # INT8
    out = OrtRunner(proto, optimize=False).run(x)
    assert bool(((out - ev.outputs(cand)[0]).abs() <= _one_step_bound(ev, x)).all())


def test_narrow_weights_are_stored_as_int4_and_run_on_int8_kernels():
    _task, _analysis, ev, x = _tiny_case()
    cand = Candidate({"conv": LayerChoice(Precision.INT4, Precision.INT8), "fc": LayerChoice(Precision.INT3, Precision.INT8)})
    dep = build(ev, cand, weight_dtype="int8")
    assert dep.storage == {"conv": "int4", "fc": "int4"}
    types = {t.name: t.data_type for t in dep.proto.graph.initializer}
    assert types["conv.weight_quantized_int4"] == types["fc.weight_quantized_int4"] == 22  # INT4
    runner = OrtRunner(dep.proto)
    assert runner.int8_kernels == 2, runner.op_counts  # the Cast to INT8 is folded when ORT loads it
    kept = build(ev, cand, weight_dtype="int8", int4_storage=False)
    assert kept.storage == {"conv": "int8", "fc": "int8"}
    assert torch.equal(OrtRunner(kept.proto).run(x), runner.run(x))


def test_two_and_three_bit_weights_ship_every_level_and_run_as_simulated():
    """int2 weights on {-2, -1, 0, 1}, int3 on -4..3 (mpsearch.scoring.quant.weight_range): the
    deployed graph stores the same integers in INT4 and ONNX Runtime computes what the evaluator
    simulates (within one activation step, as for int8)."""
    import numpy as np
    from onnx import numpy_helper

    _task, _analysis, ev, x = _tiny_case()
    cand = Candidate({"conv": LayerChoice(Precision.INT2, Precision.INT8), "fc": LayerChoice(Precision.INT3, Precision.INT8)})
    dep = build(ev, cand, weight_dtype="int8", int4_storage=False)  # int8 containers: numpy reads them
    inits = {t.name: numpy_helper.to_array(t) for t in dep.proto.graph.initializer}
    conv = np.abs(inits["conv.weight_quantized"]).astype(int)  # |levels|: a folding sign may flip a channel
    fc = inits["fc.weight_quantized"].astype(int)
    assert set(np.unique(conv)) == {0, 1, 2} and fc.min() >= -4 and fc.max() <= 3 and len(np.unique(fc)) == 8
    out = OrtRunner(dep.proto, optimize=False).run(x)
    # a conv with 2-bit weights puts its outputs on a coarse lattice, so more of them than at 8 bits
    # land within float rounding of a rounding boundary of fc's input (measured: up to 4 of 100
    # in a sample); each is one activation step, times fc's int3 weight, plus fc's int32 bias rounding
    step = ev.act_params("fc", Precision.INT8).scale
    _, fc_scale = weight_ints(ev, "fc", Precision.INT3)
    bound = 5 * step * ev.weight("fc", Precision.INT3).abs().amax(1) + 0.5 * step * fc_scale + 1e-4
    assert bool(((out - ev.outputs(cand)[0]).abs() <= bound).all())
    assert torch.equal(OrtRunner(build(ev, cand, weight_dtype="int8").proto).run(x), OrtRunner(dep.proto).run(x))


@pytest.mark.slow  # ~5 s: torch.export + onnxscript
def test_dynamo_exporter_gives_the_fp32_model():
    task, _, _, x = _tiny_case(bn=True)
    runner = OrtRunner(export_fp32(task.model, x, exporter="dynamo"))
    with torch.no_grad():
        assert torch.allclose(runner.run(x), task.model(x), atol=1e-5)


def test_fp32_export_matches_torch():
    task, _, _, x = _tiny_case(bn=True)
    runner = OrtRunner(export_fp32(task.model, x), threads=None)
    with torch.no_grad():
        assert torch.allclose(runner.run(x), task.model(x), atol=1e-5)
    assert runner.int8_kernels == 0


def test_sessions_stop_spinning_after_a_run():
    """Sessions timed side by side: an idle session's workers must not spin on the shared cores."""
    task, _, _, x = _tiny_case(bn=True)
    runner = OrtRunner(export_fp32(task.model, x), threads=2)
    so = runner.session.get_session_options()
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1


def test_bad_weight_dtype_and_undeployable_activations_are_refused():
    _task, _, ev, _ = _tiny_case()
    cand = Candidate({"conv": W8A8, "fc": W8A8})
    with pytest.raises(ValueError, match="weight_dtype"):
        build(ev, cand, weight_dtype="int4")
    with pytest.raises(InvalidConfigError, match=r"layer 'fc' \(int8/int4\): cannot deploy an int4 activation"):
        build(ev, Candidate({"conv": W8A8, "fc": LayerChoice(Precision.INT8, Precision.INT4)}))


def test_weight_not_matching_its_initializer_is_refused():
    task, _, _, x = _tiny_case()

    class Wrapped(nn.Module):  # fc's weight is used transformed: the graph holds no copy of it
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = torch.flatten(F.relu(self.inner.conv(x)), 1)
            return F.linear(h, self.inner.fc.weight * 2 + 1, self.inner.fc.bias)

    wrapped = Wrapped(task.model).eval()
    t = Task(name="w", model=wrapped, calib_batches=task.calib_batches, eval_batches=task.eval_batches,
             metric_name="accuracy", metric_fn=accuracy, kind="classifier")
    ev = Evaluator(t, analyze(wrapped, x))
    with pytest.raises(InvalidConfigError, match="'inner.fc'"):
        build(ev, Candidate({"inner.conv": W8A8, "inner.fc": W8A8}))


def test_missing_onnxruntime_names_the_package(monkeypatch):
    task, _, _, x = _tiny_case()
    proto = export_fp32(task.model, x)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"onnxruntime"):
        OrtRunner(proto)


def test_default_weight_dtype_follows_this_cpu():
    """int8 weights where the CPU has VNNI (or is no x86), uint8 on an x86 CPU without it (ONNX
    Runtime's u8s8 kernels saturate there); MPSEARCH_TEST_VNNI=0 runs the tests as on such a CPU."""
    import os
    import platform
    from pathlib import Path

    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")
    flags = {f for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
             for f in line.split(":", 1)[1].split()}
    vnni = bool(flags & {"avx512_vnni", "avx_vnni", "amx_int8"}) and os.environ.get("MPSEARCH_TEST_VNNI") != "0"
    assert default_weight_dtype() == ("int8" if vnni or not x86 else "uint8")


# -- the real digits task ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_report():
    from mpsearch.deploy.faithfulness import compare_int8
    from mpsearch.scoring.analysis import analyze
    from mpsearch.scoring.evaluator import Evaluator
    from mpsearch.tasks import load_task

    task = load_task("digits")
    analysis = analyze(task.model, task.example_input)
    evaluator = Evaluator(task, analysis)
    try:
        yield compare_int8(task, analysis, evaluator, latency_runs=2), evaluator, analysis
    finally:
        evaluator.close()


def test_digits_w8a8_simulation_agrees_with_ort_int8(digits_report):
    report, _, analysis = digits_report
    assert report.n_layers == len(analysis.fqns) == 8
    assert report.n_act_quantized == 8  # every layer reads an int8 input
    assert report.n_samples == 360
    assert report.agreement >= 0.99  # the requirement
    assert report.rel_max_diff < 0.05, report.to_dict()
    # no further from the simulation than the simulation is from itself after an ulp of noise
    assert report.max_abs_diff <= 2 * report.floor_max_abs_diff + 1e-3 * report.output_scale
    assert abs(report.ort_metric - report.sim_metric) <= 0.01
    assert report.int8_kernels >= 8, report.ort_ops  # every layer runs an int8 kernel


def test_digits_report_to_dict_and_evaluator_state(digits_report):
    report, evaluator, analysis = digits_report
    d = report.to_dict()
    assert d["task"] == "digits" and d["metric_name"] == "accuracy"
    assert isinstance(d["ort_ops"], dict) and d["ort_ops"].get("QLinearConv", 0) >= 6
    assert all(math.isfinite(d[k]) for k in ("latency_fp32_ms", "latency_int8_ms", "rel_max_diff"))
    assert d["weight_dtype"] in ("int8", "uint8")
    # the evaluator was left with its FP32 weights
    for fqn in analysis.fqns:
        assert torch.equal(analysis.handles[fqn].weight, evaluator.weight(fqn, Precision.FP32))
