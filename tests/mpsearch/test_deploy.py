"""The deployed graph: the quantization rule (mpsearch.deploy.plan) on hand-made graphs, and
mobilenet_v2's deployed graphs as ONNX Runtime runs them, against the simulation."""

from __future__ import annotations

import json

import pytest

from hw_models import Candidate, LayerChoice, Precision
from mpsearch.deploy.plan import DeployGraph, GraphNode, Point

P = Precision
W8A8 = LayerChoice(P.INT8, P.INT8)
FP32 = LayerChoice(P.FP32, P.FP32)


# -- the rule on a hand-made graph ------------------------------------------------------------
def _block_graph() -> DeployGraph:
    """x -> c1 -> Relu -> c2 -> Add(c1's output, c2) -> GlobalAveragePool -> Flatten -> fc.

    c1's ReLU output is read by c2 and by the Add (a residual branch): only a module output can
    quantize it ("out" point); c2's output is read by the Add only; the pooled tensor by fc only."""
    nodes = [
        GraphNode("c1", "Conv", ("x",), "c1_out", "c1"),
        GraphNode("r1", "Relu", ("c1_out",), "r1_out"),
        GraphNode("c2", "Conv", ("r1_out",), "c2_out", "c2"),
        GraphNode("add", "Add", ("r1_out", "c2_out"), "add_out"),
        GraphNode("pool", "GlobalAveragePool", ("add_out",), "pool_out"),
        GraphNode("flat", "Flatten", ("pool_out",), "flat_out"),
        GraphNode("fc", "Gemm", ("flat_out",), "y", "fc"),
    ]
    points = {"r1_out": Point("out", ("block.relu",)), "c2_out": Point("out", ("block.c2",)),
              "add_out": Point("out", ("block",)), "pool_out": Point("in", ("fc",))}
    return DeployGraph(nodes, ["y"], points)


def test_structure_sources_tails_and_readers():
    g = _block_graph()
    assert g.source("flat_out") == "pool_out"  # through the Flatten
    assert g.tail("c1_out") == "r1_out"  # the ReLU a runtime fuses into c1
    assert g.tail("c2_out") == "c2_out"  # read by the Add: nothing to fuse
    assert g.readers("r1_out") == (["c2"], True)  # c2, and the Add
    assert g.readers("pool_out") == (["fc"], False)
    assert g.candidates() == ["r1_out", "c2_out", "add_out", "pool_out"]


def test_all_int8_quantizes_every_tensor_between_int8_ops():
    g = _block_graph()
    plan = g.plan({"c1": W8A8, "c2": W8A8, "fc": W8A8})
    assert plan.int8_layers == {"c1", "c2", "fc"}
    # c1's input (the graph input) on its own edge; every other tensor where it is produced
    assert dict(plan.edges) == {"c1": P.INT8}
    assert set(plan.tensors) == {"r1_out", "c2_out", "add_out", "pool_out"}
    assert plan.sim_inputs == {"c1": P.INT8, "fc": P.INT8}
    assert plan.sim_outputs == {"block.relu", "block.c2", "block"}
    assert not plan.notes


def test_an_fp32_layer_reads_int8_and_breaks_the_int8_region():
    g = _block_graph()
    plan = g.plan({"c1": W8A8, "c2": FP32, "fc": W8A8})
    # c1's output is int8 (c2 reads it dequantized: one DequantizeLinear); c2's output is float,
    # so the Add runs float and the pooled tensor is not quantized: fc quantizes its own input
    assert set(plan.tensors) == {"r1_out"}
    assert dict(plan.edges) == {"c1": P.INT8, "fc": P.INT8}
    assert plan.sim_outputs == {"block.relu"}
    # c1 fp32: c2 quantizes its own input, its output is int8, the Add's other input is float
    plan = g.plan({"c1": FP32, "c2": W8A8, "fc": FP32})
    assert set(plan.tensors) == {"c2_out"} and dict(plan.edges) == {"c2": P.INT8}


def test_weight_only_and_other_activation_precisions_quantize_their_input_only():
    g = _block_graph()
    plan = g.plan({"c1": LayerChoice(P.INT4, P.FP32), "c2": LayerChoice(P.INT4, P.INT4), "fc": FP32})
    assert plan.int8_layers == frozenset() and not plan.tensors
    assert dict(plan.edges) == {"c2": P.INT4}


def test_a_tensor_without_hook_point_is_not_quantized_and_the_plan_says_so():
    g = _block_graph()
    g.points.pop("c2_out")
    plan = g.plan({"c1": W8A8, "c2": W8A8, "fc": W8A8})
    assert "c2_out" not in plan.tensors and "add_out" not in plan.tensors  # the Add runs float
    assert "float convolution" in plan.notes["c2"]


def test_deploy_graph_round_trips_as_plain_data():
    g = _block_graph()
    d = json.loads(json.dumps(g.to_dict()))
    assert DeployGraph.from_dict(d) == g
    with pytest.raises(ValueError, match="version"):
        DeployGraph.from_dict({**d, "version": 0})


# -- mobilenet_v2 as ONNX Runtime runs it -----------------------------------------------------
@pytest.fixture(scope="module")
def mobilenet():
    pytest.importorskip("onnxruntime")
    from mpsearch.analysis import analyze
    from mpsearch.cache import cache_dir
    from mpsearch.evaluator import Evaluator
    from mpsearch.tasks import load_task

    task = load_task("mobilenet_v2")
    analysis = analyze(task.model, task.example_input)
    ev = Evaluator(task, analysis, cache_dir=cache_dir("evaluator"))
    ev.save_cache()
    yield task, analysis, ev
    ev.close()


def _uniform(analysis, choice):
    return Candidate((f, choice) for f in analysis.fqns)


def test_mobilenet_all_int8_runs_int8_end_to_end(mobilenet):
    from mpsearch import metrics
    from mpsearch.deploy.build import build
    from mpsearch.onnx_export import OrtRunner

    task, analysis, ev = mobilenet
    cand = _uniform(analysis, W8A8)
    dep = build(ev, cand)
    runner = OrtRunner(dep.proto, threads=1)
    ops = runner.op_counts
    # every layer an int8 kernel, no float convolution, the 10 residual Adds and the pooling int8,
    # one QuantizeLinear at the input and NHWC throughout (one layout Transpose at each end)
    assert runner.int8_kernels == len(analysis.fqns) == 53
    assert ops.get("QLinearConv") == 52 and ops.get("QGemm") == 1
    assert ops.get("Conv", 0) == ops.get("FusedConv", 0) == 0
    assert ops.get("QLinearAdd") == 10 and ops.get("Add", 0) == 0
    assert ops.get("QLinearGlobalAveragePool") == 1
    assert ops.get("QuantizeLinear") == 1 and ops.get("DequantizeLinear", 0) == 0
    assert ops.get("Transpose", 0) <= 2
    # the simulation quantizes the same tensors: top-1 agreement with ONNX Runtime >= 99%
    ort = [runner.run(x) for x, _ in task.eval_batches]
    assert metrics.top1_agreement(ort, ev.outputs(cand)) >= 0.99


def test_mobilenet_mixes_run_as_asked_and_agree_with_the_simulation(mobilenet):
    import random

    from mpsearch import metrics
    from mpsearch.deploy.build import build
    from mpsearch.onnx_export import OrtRunner

    task, analysis, ev = mobilenet
    rng = random.Random(5)
    for _ in range(2):
        cand = Candidate((f, W8A8 if rng.random() < 0.6 else FP32) for f in analysis.fqns)
        runner = OrtRunner(build(ev, cand).proto, threads=1)
        n_int8 = sum(c == W8A8 for c in cand.values())
        # one int8 kernel per int8 layer: none missing (a float conv on dequantized weights), none
        # extra (an fp32 layer between int8 ones quantized by ONNX Runtime's WeightBiasQuantization)
        assert runner.int8_kernels == n_int8, runner.op_counts
        ort = [runner.run(x) for x, _ in task.eval_batches]
        assert metrics.top1_agreement(ort, ev.outputs(cand)) >= 0.99
