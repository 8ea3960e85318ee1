"""The deployed graph's quantization rule (hw_models.graph) on a hand-made graph, and the cost
model pricing that graph's conversions."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hw_models import Candidate, CostModel, LayerChoice, LayerSpec, Precision, get_profile
from hw_models.graph import DeployGraph, GraphNode, Point

P = Precision
W8A8 = LayerChoice(P.INT8, P.INT8)
FP32 = LayerChoice(P.FP32, P.FP32)


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




def test_boundaries_are_where_float_meets_int8():
    g = _block_graph()
    kinds = lambda plan: sorted((b.kind, b.tensor, b.layer) for b in g.boundaries(plan))
    # all int8: one QuantizeLinear at the input, none inside; fc's output is float already (QGemm)
    assert kinds(g.plan({"c1": W8A8, "c2": W8A8, "fc": W8A8})) == [("q", "x", "c1")]
    # c2 fp32: c1's int8 output is read by c2 and by the Add (now float): one DequantizeLinear, charged
    # to c1; fc quantizes the pooled float tensor
    assert kinds(g.plan({"c1": W8A8, "c2": FP32, "fc": W8A8})) == [
        ("dq", "r1_out", "c1"), ("q", "pool_out", "fc"), ("q", "x", "c1")]
    # all fp32: nothing converts
    assert kinds(g.plan({"c1": FP32, "c2": FP32, "fc": FP32})) == []


def test_cost_model_prices_the_deployed_graphs_conversions():
    g = _block_graph()
    g.elems.update({"x": 100, "r1_out": 400, "c2_out": 400, "add_out": 400, "pool_out": 16})
    layers = [LayerSpec("c1", "conv2d", (16, 4, 1, 1), 1, 6400, 100, 400),
              LayerSpec("c2", "conv2d", (16, 16, 1, 1), 1, 6400, 400, 400),
              LayerSpec("fc", "linear", (10, 16), 1, 160, 16, 10)]
    prof = dataclasses.replace(get_profile("x86-vnni"), transition_overhead_s=2e-6, quantize_bytes_per_elem=4.0,
                               dequantize_bytes_per_elem=10.0)
    chain, deployed = CostModel(layers, prof, 2), CostModel(layers, prof, 2, graph=g)
    cand = Candidate({"c1": W8A8, "c2": FP32, "fc": W8A8})
    layer_sum = sum(chain.layer_cost(f, c).latency_s for f, c in cand.items())
    bw = prof.mem_bw_bytes_per_s
    # batch 2: Q of x (100 elements), DQ of r1_out (400), Q of pool_out (16)
    expected = layer_sum + 3 * 2e-6 + 2 * (100 * 4.0 + 400 * 10.0 + 16 * 4.0) / bw
    cost = deployed.price(cand)
    assert cost.latency_s == pytest.approx(expected) and cost.transitions == 3
    assert cost.transition_s == pytest.approx(expected - layer_sum)
    # charged to layers in the breakdown: c1 its input's Q and its output's DQ, fc its input's Q
    by = {c.fqn: c.transition_s for c in deployed.breakdown(cand)}
    assert by["c1"] == pytest.approx(2 * 2e-6 + 2 * (100 * 4.0 + 400 * 10.0) / bw)
    assert by["fc"] == pytest.approx(2e-6 + 2 * 16 * 4.0 / bw) and by["c2"] == 0.0
    # a candidate with a compute kind the rule does not describe is priced along the chain
    assert deployed.boundaries(Candidate({"c1": W8A8, "c2": LayerChoice(P.INT4, P.INT8), "fc": W8A8})) is not None
    assert CostModel(layers, get_profile("h100"), 2, graph=g).boundaries(
        Candidate({"c1": LayerChoice(P.BF16, P.BF16), "c2": W8A8, "fc": W8A8})) is None
