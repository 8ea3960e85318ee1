"""mobilenet_v2's deployed graphs (the rule: hw_models.graph, tests/hw_models/test_graph.py) as ONNX
Runtime runs them, against the simulation."""

from __future__ import annotations

import pytest

from hw_models import Candidate, LayerChoice, Precision

P = Precision
W8A8 = LayerChoice(P.INT8, P.INT8)
FP32 = LayerChoice(P.FP32, P.FP32)


# -- mobilenet_v2 as ONNX Runtime runs it -----------------------------------------------------
@pytest.fixture(scope="module")
def mobilenet():
    pytest.importorskip("onnxruntime")
    from mpsearch.cache import cache_dir
    from mpsearch.scoring.analysis import analyze
    from mpsearch.scoring.evaluator import Evaluator
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
