"""QDQ export and ONNX Runtime int8 against the simulated quantizer."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from hw_models import Precision
from mpsearch.errors import MissingDependencyError
from mpsearch.onnx_export import (
    LayerQDQ,
    OrtRunner,
    count_int8_kernels,
    default_weight_dtype,
    export_qdq,
)

# ORT kernels for these weight formats are correct on every CPU (u8 weights: no int16 saturation
# on x86 without VNNI); "int8" is checked through ORT's reference (unoptimized) graph.
PORTABLE = "uint8"
H_SCALE = 0.04  # hand-set scale of the Linear's input (the ReLU output stays below ~6 of 10.2)


def _fake_quant(x: torch.Tensor, scale: float, zero_point: int) -> torch.Tensor:
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def _ints(shape, generator) -> torch.Tensor:
    return torch.randint(-127, 128, shape, generator=generator, dtype=torch.int8)


class Tiny(nn.Module):
    """Conv -> ReLU -> Flatten -> Linear (optionally a BatchNorm after the conv)."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


def _tiny_case(bn: bool = False):
    g = torch.Generator().manual_seed(0)
    model = Tiny(bn).eval()
    if bn:  # a negative gamma flips the sign of a folded channel
        model.bn.weight.data = torch.tensor([1.5, -0.7, 0.3, -1.0])
        model.bn.bias.data = torch.tensor([0.1, -0.2, 0.05, 0.3])
        model.bn.running_mean.data = torch.tensor([0.2, -0.1, 0.0, 0.4])
        model.bn.running_var.data = torch.tensor([1.0, 2.0, 1.0, 0.5])
    conv_q = LayerQDQ(_ints((4, 2, 3, 3), g), torch.tensor([0.004, 0.002, 0.006, 0.003]), 0.02, 128)
    fc_q = LayerQDQ(_ints((3, 100), g), torch.tensor([0.001, 0.0015, 0.002]), H_SCALE, 0)
    x = torch.randn(16, 2, 5, 5, generator=g)

    def sim(x):
        w = conv_q.weight_int.float() * conv_q.weight_scale.reshape(-1, 1, 1, 1)
        h = F.relu(model.bn(F.conv2d(_fake_quant(x, 0.02, 128), w, model.conv.bias, padding=1)))
        h_q = _fake_quant(torch.flatten(h, 1), H_SCALE, 0)
        return F.linear(h_q, fc_q.weight_int.float() * fc_q.weight_scale.reshape(-1, 1), model.fc.bias)

    # hand-set activation scales must cover the range (a clamped ReLU output would be a bad test)
    with torch.no_grad():
        w = conv_q.weight_int.float() * conv_q.weight_scale.reshape(-1, 1, 1, 1)
        h = F.relu(model.bn(F.conv2d(_fake_quant(x, 0.02, 128), w, model.conv.bias, padding=1)))
    assert float(h.max()) < H_SCALE * 255
    return model, {"conv": conv_q, "fc": fc_q}, x, sim, fc_q


def _one_step_bound(fc_q: LayerQDQ) -> torch.Tensor:
    """Per output: one input of fc one activation step off, plus the int32 bias rounding (the
    outputs agree to ~1e-5 here: nothing sits on a rounding boundary)."""
    w = fc_q.weight_int.float().abs() * fc_q.weight_scale.reshape(-1, 1)
    return H_SCALE * w.amax(1) + 0.5 * H_SCALE * fc_q.weight_scale + 1e-4


@pytest.mark.parametrize("bn", [False, True], ids=["conv", "conv+batchnorm"])
def test_tiny_model_ort_matches_simulation_within_one_step(bn):
    model, layers, x, sim, fc_q = _tiny_case(bn)
    with torch.no_grad():
        expected = sim(x)
        fp32_before = model(x)
    proto = export_qdq(model, x[:4], layers, weight_dtype=PORTABLE)  # batch dimension is dynamic
    with torch.no_grad():
        assert torch.equal(model(x), fp32_before)  # the model is left alone
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == 3  # conv input, fc input, and before the Flatten
    assert ops.count("DequantizeLinear") == 3 + 2 + 2  # activations, weights, int32 biases
    bound = _one_step_bound(fc_q)
    for optimize in (False, True):
        runner = OrtRunner(proto, optimize=optimize)
        out = runner.run(x)
        assert out.shape == expected.shape
        assert bool(((out - expected).abs() <= bound).all()), (optimize, (out - expected).abs().max())
        assert float((out - expected).abs().median()) < 1e-3
    assert runner.int8_kernels == 2, runner.op_counts  # QLinearConv + QGemm
    assert count_int8_kernels(runner.optimized_model) == 2


def test_int8_weights_reference_semantics(tmp_path):
    model, layers, x, sim, fc_q = _tiny_case()
    path = tmp_path / "tiny.onnx"
    proto = export_qdq(model, x, layers, path=path, weight_dtype="int8")
    assert path.is_file()
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("weight_quantized")]
    assert len(dqs) == 2
    inits = {t.name: t for t in proto.graph.initializer}
    assert all(inits[n.input[0]].data_type == 3 for n in dqs)  # INT8
    with torch.no_grad():
        expected = sim(x)
    out = OrtRunner(proto, optimize=False).run(x)
    assert bool(((out - expected).abs() <= _one_step_bound(fc_q)).all())


@pytest.mark.slow  # ~5 s: torch.export + onnxscript
def test_dynamo_exporter_gives_the_same_graph_semantics():
    model, layers, x, sim, fc_q = _tiny_case(bn=True)
    proto = export_qdq(model, x, layers, weight_dtype=PORTABLE, exporter="dynamo")
    with torch.no_grad():
        expected = sim(x)
    runner = OrtRunner(proto)
    assert bool(((runner.run(x) - expected).abs() <= _one_step_bound(fc_q)).all())
    assert runner.int8_kernels == 2


def test_fp32_export_matches_torch():
    model, _, x, _, _ = _tiny_case(bn=True)
    runner = OrtRunner(export_qdq(model, x, {}), threads=None)
    with torch.no_grad():
        assert torch.allclose(runner.run(x), model(x), atol=1e-5)
    assert runner.int8_kernels == 0


def test_sessions_stop_spinning_after_a_run():
    """Sessions timed side by side: an idle session's workers must not spin on the shared cores."""
    model, _, x, _, _ = _tiny_case(bn=True)
    runner = OrtRunner(export_qdq(model, x, {}), threads=2)
    so = runner.session.get_session_options()
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    assert so.intra_op_num_threads == 2 and so.inter_op_num_threads == 1


def test_unknown_layer_and_bad_layer_data_are_refused():
    model, layers, x, _, _ = _tiny_case()
    with pytest.raises(ValueError, match="'nope'"):
        export_qdq(model, x, {**layers, "nope": layers["fc"]})
    with pytest.raises(ValueError, match="'fc'.*shape"):
        export_qdq(model, x, {"fc": layers["conv"]})
    with pytest.raises(ValueError, match="int8"):
        LayerQDQ(torch.zeros(3, 4), torch.ones(3))
    with pytest.raises(ValueError, match="one per output channel"):
        LayerQDQ(torch.zeros(3, 4, dtype=torch.int8), torch.ones(4))
    with pytest.raises(ValueError, match="together"):
        LayerQDQ(torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), act_scale=0.1)
    with pytest.raises(ValueError, match="0..255"):
        LayerQDQ(torch.zeros(3, 4, dtype=torch.int8), torch.ones(3), 0.1, 256)
    with pytest.raises(ValueError, match="weight_dtype"):
        export_qdq(model, x, layers, weight_dtype="int4")


def test_weight_not_matching_its_initializer_is_refused():
    model, layers, x, _, _ = _tiny_case()

    class Wrapped(nn.Module):  # fc's weight is used transformed: the graph holds no copy of it
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            h = torch.flatten(F.relu(self.inner.conv(x)), 1)
            return F.linear(h, self.inner.fc.weight * 2 + 1, self.inner.fc.bias)

    with pytest.raises(ValueError, match="'inner.fc'"):
        export_qdq(Wrapped(model), x, {"inner.fc": layers["fc"]})


def test_missing_onnxruntime_names_the_extra(monkeypatch):
    model, layers, x, _, _ = _tiny_case()
    proto = export_qdq(model, x, layers)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(MissingDependencyError, match=r"mpsearch\[onnx\]"):
        OrtRunner(proto)


def test_default_weight_dtype_is_known():
    assert default_weight_dtype() in ("int8", "uint8")


# -- the real digits task ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_report():
    from mpsearch.analysis import analyze
    from mpsearch.evaluator import Evaluator
    from mpsearch.faithfulness import compare_int8
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
    assert report.n_act_quantized == 8
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
