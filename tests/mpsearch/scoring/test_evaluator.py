"""Evaluator: quantizer settings, bias correction, disk cache, bad input."""

import pytest
import torch

from hw_models import Candidate, Precision
from mpsearch.errors import EvaluationError, InvalidConfigError
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator, QuantSettings
from mpsearch.tasks import Task, load_task

P = Precision


@pytest.fixture(scope="module")
def digits():
    task = load_task("digits")
    return task, analyze(task.model, task.example_input)


def test_bias_correction_restores_the_mean_output_of_a_linear_layer(digits):
    task, analysis = digits
    ev = Evaluator(task, analysis, QuantSettings(bias_correction="on", weight_clipping="minmax"))
    fqn = "classifier.3"  # Linear(64 -> 10)
    layer = analysis.handles[fqn].module
    inputs = []
    hk = layer.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        for b in task.calib_batches:
            task.model(b)
    hk.remove()
    x = torch.cat(inputs)
    w = ev._fp32_weights[fqn]
    wq = ev.weight(fqn, P.INT3)
    delta = ev.bias_delta(fqn, P.INT3)
    assert torch.allclose(delta, (wq - w) @ x.mean(0), atol=1e-5)  # (W_q - W) E[x] by hand
    fp32_mean = (x @ w.T).mean(0)
    corrected = (x @ wq.T - delta).mean(0)
    uncorrected = (x @ wq.T).mean(0)
    assert torch.allclose(corrected, fp32_mean, atol=1e-4)
    assert (uncorrected - fp32_mean).abs().max() > 10 * (corrected - fp32_mean).abs().max()
    # auto: only 6 bits and below
    auto = QuantSettings()
    assert auto.corrects_bias(P.INT6) and not auto.corrects_bias(P.INT8) and not auto.corrects_bias(P.FP32)
    ev.close()


@pytest.mark.parametrize("fold", [True, False])
def test_the_tasks_model_is_left_as_it_was(fold):
    """digits has no batch norm, so nothing is folded: the evaluator still scores its own copy."""
    task = load_task("digits")
    analysis = analyze(task.model, task.example_input)
    before = {k: (v.data_ptr(), v.clone()) for k, v in task.model.state_dict().items()}
    ev = Evaluator(task, analysis, QuantSettings(fold_batchnorm=fold))
    assert ev.model is not task.model and ev.folded == []
    while_scoring = []
    hook = task.model.features[0].register_forward_hook(lambda *a: while_scoring.append(1))
    # int2 weights: far from FP32 on any CPU (0.40 against 0.99; int4 can tie FP32 on digits)
    score = ev.score(Candidate.uniform(analysis.fqns, P.INT2, P.INT8))
    hook.remove()
    assert while_scoring == [] and 0 < score.metric < task.fp32_metric - 0.3
    for k, v in task.model.state_dict().items():
        assert v.data_ptr() == before[k][0] and torch.equal(v, before[k][1]), k
        assert v.is_contiguous(), k  # not turned channels-last
    ev.close()


def test_disk_cache_is_reused_and_keyed_by_settings(digits, tmp_path):
    task, analysis = digits
    cand = Candidate.uniform(analysis.fqns, P.INT4, P.INT8)
    a = Evaluator(task, analysis, cache_dir=tmp_path)
    assert not a.cache_loaded
    score = a.score(cand)
    path = a.save_cache()
    a.close()
    b = Evaluator(task, analysis, cache_dir=tmp_path)
    assert b.cache_loaded and b.cache_path == path
    assert (P.INT4 in {p for _, p in b._weights})  # quantized weights came from disk
    assert b.score(cand) == score
    b.close()
    c = Evaluator(task, analysis, QuantSettings(act_range="percentile"), cache_dir=tmp_path)
    assert not c.cache_loaded and c.cache_key() != b.cache_key()
    c.close()
    path.write_bytes(b"not a torch file")
    d = Evaluator(task, analysis, cache_dir=tmp_path)  # a damaged cache is rebuilt
    assert not d.cache_loaded and d.score(cand) == score
    d.close()


@pytest.mark.parametrize("act_range", ["percentile", "mse"])
def test_histogram_ranges_and_mse_clipping_score(digits, act_range):
    task, analysis = digits
    ev = Evaluator(task, analysis, QuantSettings(act_range=act_range, weight_clipping="mse"))
    s = ev.score(Candidate.uniform(analysis.fqns, P.INT4, P.INT8))
    assert 0.5 < s.metric <= 1.0 and s.proxies["kl_to_fp32"] >= 0
    ev.close()


def test_invalid_settings():
    with pytest.raises(InvalidConfigError, match="act_range"):
        QuantSettings(act_range="entropy")
    with pytest.raises(InvalidConfigError, match="group_size"):
        QuantSettings(group_size=0)


def test_bad_metric_and_bad_calibration_data(digits):
    task, analysis = digits

    def broken(outputs, targets):
        raise ZeroDivisionError("no samples")

    bad = Task("broken", task.model, task.calib_batches, task.eval_batches, "m", broken, fp32_metric=1.0)
    ev = Evaluator(bad, analysis)
    with pytest.raises(EvaluationError, match="raised ZeroDivisionError: no samples"):
        ev.score(Candidate.uniform(analysis.fqns, P.INT8, P.INT8))
    ev.close()
    nan = task.calib_batches[0].clone()
    nan[0, 0, 0, 0] = float("nan")
    with pytest.raises(EvaluationError, match="calibration batch 0: non-finite input to layer features.0"):
        Evaluator(Task("nan", task.model, [nan], task.eval_batches, "accuracy", task.metric_fn), analysis)


def test_adaround_weights_are_on_the_grid_and_reconstruct_better(digits, tmp_path):
    task, analysis = digits
    settings = QuantSettings(weight_clipping="minmax", bias_correction="off")
    near = Evaluator(task, analysis, settings)
    ada = Evaluator(task, analysis, QuantSettings(weight_clipping="minmax", bias_correction="off",
                                                  weight_rounding="adaround"), cache_dir=tmp_path)
    fqn = "features.2"
    # the layer's FP32 input on the first calibration samples, as a hook on the model sees it
    seen = []
    hk = analysis.handles[fqn].module.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        task.model(task.calib_batches[0])
    hk.remove()
    x = ada._layer_inputs(fqn)
    # the evaluator runs its own copy in channels-last format: the same numbers up to float rounding
    assert torch.allclose(x, seen[0][: x.shape[0]], rtol=1e-5, atol=1e-5)
    w = ada._fp32_weights[fqn]
    wq_near, wq_ada = near.weight(fqn, P.INT3), ada.weight(fqn, P.INT3)
    # int3 min-max on the grid [-4, 3]: the smallest scale covering each channel's [min, max]
    scale = torch.maximum(w.amax(dim=(1, 2, 3), keepdim=True) / 3, w.amin(dim=(1, 2, 3), keepdim=True) / -4)
    ints = wq_ada / scale
    assert torch.allclose(ints, ints.round(), atol=1e-4) and ints.min() >= -4 - 1e-4 and ints.max() <= 3 + 1e-4
    assert ((wq_ada / scale - w / scale).abs() < 1 + 1e-4).all()  # floor or ceil
    assert not torch.equal(wq_ada, wq_near)
    conv = analysis.handles[fqn].module

    def err(wq):
        f = torch.nn.functional.conv2d
        return float((f(x, wq, None, 1, 1) - f(x, w, None, 1, 1)).pow(2).mean())

    assert err(wq_ada) < 0.8 * err(wq_near)
    assert conv.padding == (1, 1)
    # 8-bit weights keep round-to-nearest; precompute + disk cache
    assert torch.equal(ada.weight(fqn, P.INT8), near.weight(fqn, P.INT8))
    assert ada.precompute_weights([P.INT3]) == len(analysis.fqns) - 1
    cand = Candidate.uniform(analysis.fqns, P.INT3, P.INT8)
    assert ada.score(cand).proxies["kl_to_fp32"] < near.score(cand).proxies["kl_to_fp32"]
    ada.save_cache()
    again = Evaluator(task, analysis, ada.settings, cache_dir=tmp_path)
    assert again.cache_loaded and torch.equal(again.weight(fqn, P.INT3), wq_ada)
    for ev in (near, ada, again):
        ev.close()


def test_intervals_beside_the_metric_and_the_kl(digits):
    """digits' accuracy is a share of 360 samples: the Wilson interval; its KL to FP32: the mean of
    the per-sample KLs +- 1.96 standard errors; a metric that is no share: the metric +- 1.96
    standard errors of its per-batch values (mpsearch.metrics' module doc)."""
    from mpsearch import metrics

    task, analysis = digits
    ev = Evaluator(task, analysis, cache_dir=None)
    cand = Candidate.uniform(analysis.fqns, P.INT4, P.INT8)
    s = ev.score(cand)
    assert s.intervals["metric"] == pytest.approx(metrics.wilson_interval(s.metric, 360), rel=1e-12)
    lo, hi = s.intervals["metric"]
    assert lo < s.metric < hi and hi - lo < 0.1
    outputs = ev.outputs(cand)
    kl = metrics.kl_per_sample(outputs, ev.reference_outputs).tolist()
    half = metrics.Z95 * metrics.standard_error(kl)
    assert s.proxies["kl_to_fp32"] == pytest.approx(sum(kl) / 360, rel=1e-9)
    assert s.intervals["kl_to_fp32"] == pytest.approx((max(0.0, sum(kl) / 360 - half), sum(kl) / 360 + half), rel=1e-9)
    ev.close()

    def mean_logit(outputs, targets):  # no share of samples
        return float(torch.cat(outputs).mean())

    other = Task("digits-logit", task.model, task.calib_batches, task.eval_batches, "mean_logit", mean_logit)
    ev = Evaluator(other, analysis, cache_dir=None)
    s = ev.score(cand)
    per_batch = [mean_logit([o], None) for o in ev.outputs(cand)]
    se = metrics.standard_error(per_batch)
    assert len(per_batch) == 3 and se > 0
    assert s.intervals["metric"] == pytest.approx((s.metric - metrics.Z95 * se, s.metric + metrics.Z95 * se), rel=1e-9)
    ev.close()
