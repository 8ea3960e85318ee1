"""Latency measurement of mixed-precision configurations in ONNX Runtime (mpsearch.deploy.measure)."""

import math
import statistics
import tempfile

import pytest
import torch
from torch import nn

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from hw_models import Precision
from mpsearch import metrics
from mpsearch.deploy.measure import (
    attribute_nodes,
    build_session,
    config_candidate,
    layer_latencies,
    profile_layers,
    time_interleaved,
)
from mpsearch.onnx_export import OrtRunner, export_fp32
from mpsearch.scoring.analysis import analyze

# int8 layers between fp32 ones: in the deployed graph each runs as an int8 kernel (its output is
# quantized and dequantized for its fp32 consumer), every fp32 layer as a float one
SUBSET = ("features.2", "features.8", "classifier.1")


@pytest.fixture(scope="module")
def digits():
    from mpsearch.scoring.evaluator import Evaluator
    from mpsearch.tasks import load_task

    task = load_task("digits")
    analysis = analyze(task.model, task.example_input)
    evaluator = Evaluator(task, analysis)
    sessions = {
        "fp32": build_session(task, analysis, evaluator, set()),
        "int8": build_session(task, analysis, evaluator, analysis.fqns),
        "subset": build_session(task, analysis, evaluator, SUBSET),
    }
    return task, analysis, evaluator, sessions


def _ort_outputs(runner, task):
    return [runner.run(inputs) for inputs, _ in task.eval_batches]


def test_config_candidate(digits):
    task, analysis, evaluator, _ = digits
    c = config_candidate(analysis, {"features.2"}, evaluator)
    assert list(c) == list(analysis.fqns)
    assert (c["features.2"].weight, c["features.2"].activation) == (Precision.INT8, Precision.INT8)
    assert all((c[f].weight, c[f].activation) == (Precision.FP32, Precision.FP32) for f in c if f != "features.2")
    with pytest.raises(ValueError, match="nope"):
        config_candidate(analysis, {"features.2", "nope"})
    with pytest.raises(ValueError, match="nope"):
        build_session(task, analysis, evaluator, ["nope"])


def test_subset_session_runs_its_int8_layers_as_int8_kernels_and_matches_the_simulation(digits):
    task, analysis, evaluator, sessions = digits
    runner = sessions["subset"]
    assert runner.int8 == frozenset(SUBSET)
    assert runner.int8_kernels == len(SUBSET), runner.op_counts
    kernels = {}
    for name, fqn in attribute_nodes(runner.optimized_model, analysis, runner.model).items():
        kernels.setdefault(fqn, set()).add(next(n.op_type for n in runner.optimized_model.graph.node if n.name == name))
    for fqn in analysis.fqns:
        int8_ops = kernels.get(fqn, set()) & {"QLinearConv", "QGemm"}
        assert bool(int8_ops) == (fqn in SUBSET), (fqn, kernels.get(fqn))
    sim = evaluator.outputs(runner.candidate)
    assert metrics.top1_agreement(_ort_outputs(runner, task), sim) >= 0.99


def test_an_excluded_layer_between_int8_layers_stays_fp32(digits):
    """ONNX Runtime's WeightBiasQuantization quantizes the weight of a node that reads a per-tensor
    DequantizeLinear and feeds a QuantizeLinear: the deployed graph must not hand it such a node."""
    task, analysis, evaluator, _ = digits
    runner = build_session(task, analysis, evaluator, set(analysis.fqns) - {"features.4"})
    graph = runner.optimized_model.graph
    nodes = {n.name: n for n in graph.node}
    owned = [nodes[name] for name, fqn in attribute_nodes(runner.optimized_model, analysis, runner.model).items()
             if fqn == "features.4" and nodes[name].op_type not in ("QuantizeLinear", "DequantizeLinear")]
    assert [n.op_type for n in owned] in (["Conv"], ["FusedConv"])
    fp32_inits = {i.name for i in graph.initializer if i.data_type == 1}  # TensorProto.FLOAT
    assert owned[0].input[1] in fp32_inits
    # the other 7 layers run on int8 kernels, features.2 included (its output is quantized)
    assert runner.int8_kernels == 7, runner.op_counts
    # and the deployed graph computes what the evaluator simulates
    sim = evaluator.outputs(runner.candidate)
    assert metrics.top1_agreement(_ort_outputs(runner, task), sim) >= 0.99


def test_all_int8_and_all_fp32_sessions(digits):
    task, analysis, evaluator, sessions = digits
    assert sessions["int8"].int8_kernels == len(analysis.fqns)
    fp32 = sessions["fp32"]
    assert fp32.int8_kernels == 0 and fp32.int8 == frozenset()
    out = _ort_outputs(fp32, task)
    assert all(torch.allclose(o, r, atol=1e-4) for o, r in zip(out, evaluator.reference_outputs))


# -- time_interleaved ----------------------------------------------------------------------------
class _Clock:
    """A shared clock that drifts: every timed run advances it, and takes `drift(t) * cost`."""

    def __init__(self):
        self.calls = 0
        self.log = []

    def drift(self) -> float:
        return 1.0 + 0.05 * self.calls  # +5 % per run: far worse than the real machine


class _FakeRunner:
    def __init__(self, clock, name, cost):
        self.clock, self.name, self.cost = clock, name, cost

    def time_batch(self, inputs, repeats=5, warmup=True):
        times = []
        for _ in range(repeats):
            self.clock.calls += 1
            t = self.clock.drift() * self.cost
            self.clock.log.append((self.name, t))
            times.append(t)
        return times


def test_time_interleaved_cancels_linear_drift_and_reports_the_reference_median():
    clock = _Clock()
    runners = {"b": _FakeRunner(clock, "b", 2.0), "ref": _FakeRunner(clock, "ref", 1.0),
               "c": _FakeRunner(clock, "c", 0.5)}
    out = time_interleaved(runners, None, rounds=5, reference="ref")
    assert list(out) == ["b", "ref", "c"]
    ref_times = [t for name, t in clock.log if name == "ref"]
    assert len(ref_times) == 5 * 3  # ref, x, ref, y, ref per round
    assert out["ref"] == statistics.median(ref_times)
    # a linear drift cancels exactly in the bracketed ratio
    assert out["b"] == pytest.approx(2.0 * out["ref"], rel=1e-12)
    assert out["c"] == pytest.approx(0.5 * out["ref"], rel=1e-12)
    # the order is shuffled per round, reproducibly
    order = [name for name, _ in clock.log if name != "ref"]
    assert len({tuple(order[i:i + 2]) for i in range(0, len(order), 2)}) == 2
    clock2 = _Clock()
    time_interleaved({k: _FakeRunner(clock2, k, r.cost) for k, r in runners.items()}, None, rounds=5,
                     reference="ref")
    assert clock2.log == clock.log
    with pytest.raises(ValueError, match="reference"):
        time_interleaved(runners, None, reference="nope")


def test_time_interleaved_on_real_sessions(digits):
    task, _, _, sessions = digits
    batch = task.eval_batches[0][0]
    out = time_interleaved(sessions, batch, rounds=3, reference="fp32")
    assert list(out) == list(sessions)
    assert all(math.isfinite(t) and t > 0 for t in out.values()), out
    alone = time_interleaved({"fp32": sessions["fp32"]}, batch, rounds=2, reference="fp32")
    assert list(alone) == ["fp32"] and alone["fp32"] > 0


# -- per-layer latencies ---------------------------------------------------------------------------
@pytest.mark.parametrize("config", ["fp32", "int8"])
def test_layer_latencies_cover_every_layer_and_fit_in_the_run(digits, config, tmp_path, monkeypatch):
    task, analysis, _, sessions = digits
    runner = sessions[config]
    batch = task.eval_batches[0][0]
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    p = profile_layers(runner, batch, analysis, repeats=3)
    assert list(tmp_path.iterdir()) == []  # the profile JSON is removed
    assert set(p.layers) == set(analysis.fqns) and p.missing == ()
    assert all(math.isfinite(t) and t > 0 for t in p.layers.values()), p.layers
    assert p.unattributed >= 0 and p.runs == 3 and p.threads == 1
    # kernel times are parts of the run (medians of parts: a little slack)
    assert p.layer_sum + p.unattributed <= 1.05 * p.total + 20e-6
    e2e = statistics.median(runner.time_batch(batch, repeats=5))
    assert p.layer_sum <= 1.5 * e2e + 100e-6, (p.layer_sum, e2e)  # another moment on a noisy machine
    kernel_ops = {op for ops in p.kernels.values() for op in ops}
    if config == "int8":
        assert kernel_ops <= {"QLinearConv", "QGemm", "QuantizeLinear"}
        assert "QuantizeLinear" in p.kernels["features.0"]  # the model input's quantization
        assert "Transpose" in p.unattributed_ops  # NCHW <-> NHWC around QLinearConv
    else:
        assert kernel_ops <= {"Conv", "FusedGemm", "Gemm"}
    assert layer_latencies(runner, batch, analysis, repeats=1).keys() == p.layers.keys()


class _NoBias(nn.Module):
    """Convolutions without bias: ORT's NCHWc layout replaces their weights by reordered copies
    with generated names, so only their values tell which layer a node is."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.b = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.fc = nn.Linear(24 * 6 * 6, 5)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.b(torch.relu(self.a(x)))), 1))


def test_layers_without_names_are_found_by_their_weight_values():
    torch.manual_seed(0)
    model = _NoBias().eval()
    x = torch.randn(4, 3, 6, 6)
    analysis = analyze(model, x)
    proto = export_fp32(model, x)
    runner = OrtRunner(proto)
    assert "reorder" in {i for n in runner.optimized_model.graph.node for i in n.input}  # NCHWc
    owners = attribute_nodes(runner.optimized_model, analysis, proto)
    assert sorted(owners.values()) == ["a", "b", "fc"]
    assert attribute_nodes(runner.optimized_model, analysis) == owners  # the modules' weights
    p = profile_layers(proto, x, analysis, repeats=2)
    assert set(p.layers) == {"a", "b", "fc"}


def test_shared_and_ambiguous_nodes_are_not_attributed():
    """A QuantizeLinear named after layer a but feeding b's kernel too (ORT merged equal ones), and a
    value consumed by two nodes, say nothing about which layer a node is."""
    from types import SimpleNamespace

    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "a.weight")
    v = numpy_helper.from_array(np.full((4, 4), 2, np.float32), "b.weight")
    shared = numpy_helper.from_array(np.zeros(4, np.float32), "a.bias")  # used by both kernels
    s = numpy_helper.from_array(np.float32(0.1), "s")
    z = numpy_helper.from_array(np.uint8(128), "z")
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["a.input_quantized"], name="/a.input_quantized/QuantizeLinear"),
        helper.make_node("DequantizeLinear", ["a.input_quantized", "s", "z"], ["xd"], name="dq"),
        helper.make_node("Gemm", ["xd", "a.weight", "a.bias"], ["ya"], name="ka"),
        helper.make_node("Gemm", ["a.input_quantized", "b.weight", "a.bias"], ["yb"], name="kb"),
        helper.make_node("Add", ["ya", "yb"], ["y"], name="add"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w, v, shared, s, z])
    analysis = SimpleNamespace(fqns=("a", "b"), handles={})
    owners = attribute_nodes(helper.make_model(graph), analysis)
    assert owners == {"ka": "a", "kb": "b"}  # by their weights; the Q feeds b's kernel: left out
