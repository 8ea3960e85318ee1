"""Exporting a searched configuration and applying it: simulated (apply) and ONNX QDQ (export_onnx)."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import mpsearch
from hw_models import Candidate
from mpsearch import metrics
from mpsearch.deploy.export import (
    CONFIG_SCHEMA,
    apply,
    apply_task,
    export_config,
    export_onnx,
    read_config,
    write_config,
)
from mpsearch.errors import InvalidConfigError
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator, QuantSettings
from mpsearch.tasks import load_task

LAYERS = ("features.0", "features.2", "features.4", "features.6", "features.8", "features.10",
          "classifier.1", "classifier.3")
KEYS = {"schema", "task", "target", "trial", "metric", "metric_name", "latency_ms", "weight_bytes", "quant",
        "layers"}


@pytest.fixture(scope="module")
def searched(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "s"
    result = mpsearch.search("digits", n_trials=6, seed=0, strategy="optuna", track=False, progress=False,
                             out_dir=out)
    return out, result


@pytest.fixture(scope="module")
def task():
    return load_task("digits")


def config(layers: dict[str, str], **extra) -> dict:
    """A hand-written configuration: {fqn: "weight/activation"}."""
    return {"schema": CONFIG_SCHEMA, **extra,
            "layers": {f: dict(zip(("weight", "activation"), c.split("/"))) for f, c in layers.items()}}


# -- configuration files --------------------------------------------------------------------
def test_export_config_of_the_best_trial_and_of_trial_0_round_trips(searched, tmp_path):
    out, result = searched
    best = export_config(out)
    record = result.trial(result.best)
    assert set(best) == KEYS and best["schema"] == CONFIG_SCHEMA
    assert (best["task"], best["trial"], best["metric_name"]) == ("digits", result.best, "accuracy")
    assert best["target"] == result.target
    assert (best["metric"], best["latency_ms"], best["weight_bytes"]) == (
        record.metric, record.latency_ms, record.weight_bytes)
    assert best["quant"] == result.settings["quant"] == QuantSettings().to_dict()
    assert list(best["layers"]) == list(LAYERS)  # the model's layer order
    assert best["layers"] == record.config.to_dict()

    first = export_config(out / "result.json", trial=0)
    assert first["trial"] == 0 and first["layers"] == result.trial(0).config.to_dict()

    path = tmp_path / "config.json"
    write_config(first, path)
    assert json.loads(path.read_text())["schema"] == CONFIG_SCHEMA
    assert read_config(path) == first
    assert read_config(first) == first
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left behind


def test_export_config_refuses_unknown_and_unfinished_trials(searched, tmp_path):
    out, _ = searched
    with pytest.raises(InvalidConfigError, match=r"there is no trial 99 \(the search has trials 0\.\.5\)"):
        export_config(out, trial=99)
    with pytest.raises(InvalidConfigError, match=r"no such file"):
        export_config(tmp_path / "nowhere")
    d = json.loads((out / "result.json").read_text())
    d["trials"][1].update(state="fail", metric=None, reason="EvaluationError: non-finite model output")
    (tmp_path / "result.json").write_text(json.dumps(d))
    with pytest.raises(InvalidConfigError, match=r"trial 1 is fail, not complete: EvaluationError: non-finite"):
        export_config(tmp_path, trial=1)
    assert export_config(tmp_path, trial=2)["trial"] == 2


def test_read_config_refuses_wrong_schema_unknown_precision_and_bad_layers(searched, tmp_path):
    good = export_config(searched[0])
    bad = tmp_path / "bad.json"
    cases = [
        ({**good, "schema": "mpsearch.config/0"},
         r"bad\.json: expected schema 'mpsearch\.config/1', found schema 'mpsearch\.config/0'"),
        ({k: v for k, v in good.items() if k != "schema"}, r"bad\.json: .*found no schema"),
        ({**good, "layers": {**good["layers"], "features.2": {"weight": "int5", "activation": "int8"}}},
         r"bad\.json: layer 'features\.2': weight: unknown precision 'int5'"),
        ({**good, "layers": {**good["layers"], "features.4": {"weight": "int8"}}}, r"bad\.json: layer 'features\.4'"),
        ({**good, "layers": {}}, r"bad\.json: \"layers\" must be a non-empty object"),
        ({**good, "quant": {"weight_bits": 4}}, r"bad\.json: \"quant\": .*weight_bits"),
    ]
    for data, message in cases:
        bad.write_text(json.dumps(data))
        with pytest.raises(InvalidConfigError, match=message):
            read_config(bad)
    bad.write_text("{not json")
    with pytest.raises(InvalidConfigError, match=r"bad\.json: not JSON"):
        read_config(bad)
    with pytest.raises(InvalidConfigError, match=r"<config>: expected schema"):
        write_config({"layers": good["layers"]}, tmp_path / "never.json")
    assert not (tmp_path / "never.json").exists()
    upper = read_config({**good, "layers": {**good["layers"], "features.0": {"weight": "INT4", "activation": "FP32"}}})
    assert upper["layers"]["features.0"] == {"weight": "int4", "activation": "fp32"}


# -- simulated quantization -------------------------------------------------------------------
def test_apply_task_scores_what_the_search_scored_and_leaves_the_model_alone(searched, task):
    out, result = searched
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    complete = [t for t in result.trials if t.state == "complete"]
    assert complete
    for record in complete:
        applied = apply_task(task, export_config(out, record.number))
        assert applied is not task.model
        assert abs(task.evaluate(applied) - record.metric) <= 1e-6, record.number
    after = task.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert task.evaluate(task.model) == task.fp32_metric

    # output for output, the project's evaluator on the same candidate
    best = export_config(out)
    mine = dataclasses.replace(task, model=copy.deepcopy(task.model))
    ev = Evaluator(mine, analyze(mine.model, mine.example_input), QuantSettings(**best["quant"]))
    try:
        expected = ev.outputs(Candidate.from_dict(best["layers"]))
    finally:
        ev.close()
    got = task.outputs(apply_task(task, best))
    assert all(torch.equal(a, b) for a, b in zip(got, expected))


def test_apply_refuses_layers_that_do_not_match_the_model(searched, task):
    good = export_config(searched[0])["layers"]
    renamed = {("features.00" if f == "features.0" else f): c for f, c in good.items()}
    with pytest.raises(InvalidConfigError, match=r"layer 'features\.00' is not a quantizable layer of the model"):
        apply_task(task, {"schema": CONFIG_SCHEMA, "layers": renamed})
    missing = {f: c for f, c in good.items() if f != "classifier.3"}
    with pytest.raises(InvalidConfigError, match=r"the model's layer 'classifier\.3' is missing"):
        apply(task.model, {"schema": CONFIG_SCHEMA, "layers": missing}, task.calib_batches)


def test_apply_without_calibration_quantizes_the_weights_only(task):
    w8a8 = config(dict.fromkeys(LAYERS, "int8/int8"))
    w8 = config(dict.fromkeys(LAYERS, "int8/fp32"))
    x = task.example_input
    weights_only = apply(task.model, w8a8, example_input=x)
    # int8 weights get no bias correction ("auto": 6 bits and below), so this is W8 with FP32 inputs
    assert all(torch.equal(a, b) for a, b in zip(task.outputs(weights_only), task.outputs(apply_task(task, w8))))
    assert not torch.equal(weights_only(x), task.model(x))
    w = weights_only.features[2].weight.detach()
    scale = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert torch.allclose(w / scale, torch.round(w / scale), atol=1e-3)  # on the int8 grid
    with pytest.raises(InvalidConfigError, match=r"needs calib_batches, or an example_input"):
        apply(task.model, w8a8)


# -- ONNX QDQ ---------------------------------------------------------------------------------
MIXED = {"features.0": "fp32/fp32", "features.2": "int4/int8", "features.4": "int4/fp32",
         "features.6": "int8/int8", "features.8": "int4/int8", "features.10": "fp32/fp32",
         "classifier.1": "int4/int8", "classifier.3": "int8/int8"}


@pytest.mark.parametrize("layers", [dict.fromkeys(LAYERS, "int8/int8"), MIXED], ids=["w8a8", "mixed"])
def test_export_onnx_runs_in_ort_as_the_simulated_model(task, tmp_path, layers):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import numpy_helper

    from mpsearch.onnx_export import OrtRunner, default_weight_dtype

    cfg = config(layers)
    path = tmp_path / "model.onnx"
    proto = export_onnx(task, cfg, path)
    assert onnx.load(str(path)) == proto
    assert json.loads({p.key: p.value for p in proto.metadata_props}["mpsearch.config"]) == read_config(cfg)

    # one weight DequantizeLinear per integer-weight layer, its integers on that layer's grid
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    types = {t.name: t.data_type for t in proto.graph.initializer}
    casts = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Cast"}
    weight_dq = {n.input[0].removesuffix(".weight_quantized"): n for n in proto.graph.node
                 if n.op_type == "DequantizeLinear" and n.input[0].endswith(".weight_quantized")}
    int_layers = {f: c.split("/")[0] for f, c in layers.items() if c.startswith("int")}
    assert set(weight_dq) == set(int_layers)
    # INT4 storage holds int8 integers; the uint8 weights of x86 CPUs without VNNI stay on 8 bits
    int8_storage = default_weight_dtype() == "int8"
    any_narrow = int8_storage and any(int(v.removeprefix("int")) <= 4 for v in int_layers.values())
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [21 if any_narrow else 17]
    for fqn, w in int_layers.items():
        dq = weight_dq[fqn]
        narrow = int8_storage and int(w.removeprefix("int")) <= 4
        # 4 bits and fewer: an INT4 initializer widened by a Cast to INT8 (folded when ORT loads the
        # model, so the layer still runs on int8 kernels); the rest stored on 8 bits
        stored = casts.get(dq.input[0], dq.input[0])
        assert (types[stored] == onnx.TensorProto.INT4) == narrow, fqn
        assert (dq.input[0] in casts) == narrow, fqn
        zero_name = casts.get(dq.input[2], dq.input[2])
        zero = inits[zero_name].astype(int)
        assert len(set(zero.tolist())) == 1  # 0 (int8 storage) or 128 (uint8)
        ints = inits[stored].astype(int) - int(zero[0])
        q = 2 ** (int(w.removeprefix("int")) - 1) - 1
        assert ints.min() >= -q and ints.max() <= q and abs(ints).max() == q, fqn
    runtime = json.loads({p.key: p.value for p in proto.metadata_props}["mpsearch.runtime"])
    assert {f for f, st in runtime["storage"].items() if st == "int4"} == {
        f for f, w in int_layers.items() if int8_storage and int(w.removeprefix("int")) <= 4}

    # what ONNX Runtime runs: every layer with an integer weight and an int8 input on an int8 kernel,
    # nothing else (an fp32 or weight-only layer between int8 ones is not quantized behind its back)
    runner = OrtRunner(proto, threads=1)
    n_int8 = sum(c.startswith("int") and c.endswith("/int8") for c in layers.values())
    assert runner.int8_kernels == n_int8
    ort = [runner.run(x) for x, _ in task.eval_batches]
    sim = task.outputs(apply_task(task, cfg))
    assert metrics.top1_agreement(ort, sim) >= 0.98
    scale = max(float(s.abs().max()) for s in sim)
    assert max(float((a - b).abs().max()) for a, b in zip(ort, sim)) <= 0.03 * scale
    assert abs(task.score_outputs(ort) - task.score_outputs(sim)) <= 0.02


def test_export_onnx_refuses_what_qdq_cannot_express(task):
    pytest.importorskip("onnx")
    int4_act = config({**dict.fromkeys(LAYERS, "int8/int8"), "features.2": "int8/int4"})
    with pytest.raises(InvalidConfigError, match=r"layer 'features\.2' \(int8/int4\): cannot deploy an int4 "
                                                 r"activation"):
        export_onnx(task, int4_act)
