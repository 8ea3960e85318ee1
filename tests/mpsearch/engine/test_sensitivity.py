"""Per-layer sensitivity: "exact" equal to the evaluator's own KL (suffix == full forward), "fisher"
equal to it where the network after the layer is linear and close to it elsewhere, disk cache."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hw_models import Candidate, LayerChoice, Precision, get_profile
from mpsearch import metrics
from mpsearch.engine import sensitivity
from mpsearch.engine.sensitivity import Sensitivity, _chunks, _FisherRunner, measure_sensitivity
from mpsearch.errors import InvalidConfigError
from mpsearch.scoring.analysis import analyze
from mpsearch.scoring.evaluator import Evaluator
from mpsearch.tasks import Task, load_task
from search_spaces.space import SearchSpace

P = Precision
FP32 = LayerChoice(P.FP32, P.FP32)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run faster on one thread, and a busy machine cannot oversubscribe it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    task = load_task("digits")
    analysis = analyze(task.model, task.example_input)
    ev = Evaluator(task, analysis, cache_dir=None)
    space = SearchSpace(analysis.layers, get_profile("x86-vnni"), [P.INT2, P.INT4, P.INT8, P.FP32], [P.INT8, P.FP32])
    yield task, analysis, ev, {o.fqn: o.pairs for o in space.options}
    ev.close()


def _kl_by_hand(ev: Evaluator, fqn: str, c: LayerChoice, batches: int) -> float:
    """KL to FP32 with only `fqn` at `c`: the evaluator's whole-model outputs, first batches."""
    outputs = ev.outputs(Candidate({fqn: c}))[:batches]
    return metrics.kl_divergence(outputs, ev.reference_outputs[:batches])


def test_values_equal_the_evaluators_kl(digits):
    task, _, ev, _ = digits
    picks = {
        "features.0": [LayerChoice(P.INT2, P.INT8), LayerChoice(P.INT8, P.FP32)],
        "features.4": [LayerChoice(P.INT4, P.INT8), FP32, LayerChoice(P.FP32, P.INT8)],  # depthwise
        "classifier.3": [LayerChoice(P.INT3, P.FP32), LayerChoice(P.INT6, P.INT8)],
    }
    n = len(task.eval_batches)
    s = measure_sensitivity(ev, picks, batches=n, method="exact")
    assert s.measure == "kl_to_fp32" and s.path == "suffix" and s.batches == n
    for fqn, choices in picks.items():
        assert list(s.values[fqn]) == choices
        for c in choices:
            want = ev.score(Candidate({fqn: c})).proxies["kl_to_fp32"]
            assert s.values[fqn][c] == pytest.approx(want, rel=1e-9, abs=1e-15), (fqn, c)
    assert s.values["features.4"][FP32] == 0.0
    one = measure_sensitivity(ev, picks, batches=1, method="exact")
    for fqn, choices in picks.items():
        for c in choices:
            assert one.values[fqn][c] == pytest.approx(_kl_by_hand(ev, fqn, c, 1), rel=1e-9, abs=1e-15)
    # the evaluator is left as it was: FP32 weights, no quantizer on
    assert not ev._active and not ev._active_delta
    for fqn, h in ev.handles.items():
        assert getattr(h.module, h.param).data_ptr() == ev._fp32_weights[fqn].data_ptr()


def test_suffix_path_equals_full_forward_on_every_pair(digits):
    _, _, ev, options = digits
    suffix = measure_sensitivity(ev, options, method="exact")
    full = measure_sensitivity(ev, options, suffix=False)  # either method: whole forward passes are exact
    assert suffix.path == "suffix" and full.path == "full" and full.note == "suffix=False"
    assert suffix.batches == full.batches == 1  # one 120-sample batch holds DEFAULT_SAMPLES = 64
    for fqn, per in options.items():
        for c in per:
            assert suffix.values[fqn][c] == pytest.approx(full.values[fqn][c], rel=1e-5, abs=1e-12)
            assert suffix.values[fqn][c] >= 0.0
        assert suffix.values[fqn][FP32] == 0.0
        # fewer weight bits hurt more
        assert suffix.values[fqn][LayerChoice(P.INT2, P.INT8)] > suffix.values[fqn][LayerChoice(P.INT8, P.INT8)] > 0


def test_disk_cache_is_reused(digits, tmp_path):
    _, _, ev, options = digits
    some = {f: options[f] for f in list(options)[:3]}
    first = measure_sensitivity(ev, some, cache_dir=tmp_path)
    files = list(tmp_path.glob("sensitivity-*.json"))
    assert len(files) == 1 and first.from_cache == 0 and first.seconds > 0
    measured = sum(1 for per in some.values() for c in per if c != FP32)
    second = measure_sensitivity(ev, some, cache_dir=tmp_path)
    assert second.from_cache == measured and second.seconds == 0.0 and second.path == "cache"
    assert second.values == first.values
    # more layers: the cached ones are reused, the new ones measured and merged into the file
    third = measure_sensitivity(ev, options, cache_dir=tmp_path)
    assert third.from_cache == measured and third.path == "fisher"
    assert {f: third.values[f] for f in some} == first.values
    on_disk = json.loads(files[0].read_text())["values"]
    assert set(on_disk) == set(options) and on_disk["features.0"]["int2/int8"] == third.values["features.0"][
        LayerChoice(P.INT2, P.INT8)
    ]
    # another number of batches is another file (the default for "fisher" here: 2, two 120-sample
    # batches hold FISHER_POOL x DEFAULT_SAMPLES = 128), and so is another method
    assert first.batches == 2
    measure_sensitivity(ev, some, cache_dir=tmp_path, batches=1)
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 2
    exact = measure_sensitivity(ev, some, cache_dir=tmp_path, method="exact")
    assert exact.path == "suffix" and exact.from_cache == 0
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 3


def test_to_dict_round_trip(digits):
    _, _, ev, options = digits
    s = measure_sensitivity(ev, {"classifier.1": options["classifier.1"]}, batches=1)
    d = json.loads(json.dumps(s.to_dict()))
    assert d["values"]["classifier.1"]["fp32/fp32"] == 0.0
    assert Sensitivity.from_dict(d) == s


def test_bad_arguments(digits):
    _, _, ev, options = digits
    with pytest.raises(InvalidConfigError):
        measure_sensitivity(ev, options, batches=0)
    with pytest.raises(InvalidConfigError):
        measure_sensitivity(ev, options, batches=4)
    with pytest.raises(InvalidConfigError, match="nope"):
        measure_sensitivity(ev, {"nope": [FP32]})
    with pytest.raises(InvalidConfigError, match="hessian"):
        measure_sensitivity(ev, options, method="hessian")
    with pytest.raises(InvalidConfigError, match="probes"):
        measure_sensitivity(ev, options, probes=0)


def _small_task(model: nn.Module, kind: str = "classifier", batches: int = 3) -> Task:
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]
    evals = [
        (torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(batches)
    ]
    return Task("small", model.eval(), calib, evals, "accuracy", metrics.accuracy, kind=kind)


class _InPlaceResidual(nn.Module):
    """conv2's input is modified in place after conv2 ran: the suffix from conv2 must not
    corrupt the cached FP32 value that every choice's run starts from."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x):
        a = self.conv1(x)
        b = self.conv2(a)
        a.add_(b)
        return self.fc(torch.flatten(self.relu(a), 1))


class _Untraceable(_InPlaceResidual):
    def forward(self, x):
        a = self.conv1(x)
        if a.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            a = a * 0.5
        return self.fc(torch.flatten(self.relu(self.conv2(a)), 1))


@pytest.mark.parametrize(("model", "path"), [(_InPlaceResidual, "suffix"), (_Untraceable, "full")])
def test_in_place_ops_and_untraceable_models(model, path):
    """Both are measured exactly, whichever method is asked for: "fisher" cannot take gradients
    through a tensor changed in place (add_), and neither method can trace the second."""
    task = _small_task(model())
    analysis = analyze(task.model, task.example_input)
    ev = Evaluator(task, analysis, cache_dir=None)
    options = {f: [LayerChoice(w, a) for w in (P.INT2, P.INT4, P.INT8) for a in (P.INT8, P.FP32)]
               for f in analysis.fqns}
    s = measure_sensitivity(ev, options)
    assert s.path == path
    assert ("trace" if path == "full" else "in place (add_)") in s.note
    for fqn, per in options.items():
        for c in per:
            want = ev.score(Candidate({fqn: c})).proxies["kl_to_fp32"]
            assert s.values[fqn][c] == pytest.approx(want, rel=1e-9, abs=1e-15), (fqn, c)
    ev.close()


@pytest.mark.parametrize("model", [_InPlaceResidual, _Untraceable])
def test_fisher_falls_back_to_exact_on_exacts_samples_and_cache(model, tmp_path):
    """Where "fisher" cannot apply, the pass is "exact"'s own: its 64 samples (4 of these 10
    batches of 16), not fisher's pool of 128 (8 batches), written to the cache an "exact" request reads."""
    task = _small_task(model(), batches=10)
    analysis = analyze(task.model, task.example_input)
    ev = Evaluator(task, analysis, cache_dir=None)
    options = {f: [LayerChoice(w, P.INT8) for w in (P.INT2, P.INT4)] for f in analysis.fqns}
    s = measure_sensitivity(ev, options, cache_dir=tmp_path)
    assert (s.batches, s.path) == (4, "suffix" if model is _InPlaceResidual else "full")
    assert s.note
    e = measure_sensitivity(ev, options, cache_dir=tmp_path, method="exact")
    assert (e.batches, e.path, e.from_cache) == (4, "cache", 2 * len(analysis.fqns))
    assert e.values == s.values
    ev.close()


def test_other_task_kinds_use_normalized_mse(digits):
    task, analysis, _, _ = digits
    other = Task("digits-other", task.model, task.calib_batches, task.eval_batches, "accuracy",
                 task.metric_fn, fp32_metric=task.fp32_metric, kind="other")
    ev = Evaluator(other, analysis, cache_dir=None)
    c = LayerChoice(P.INT3, P.INT8)
    s = measure_sensitivity(ev, {"features.2": [c, FP32]}, batches=len(task.eval_batches), method="exact")
    assert s.measure == "normalized_mse"
    sqnr = ev.score(Candidate({"features.2": c})).proxies["sqnr_db"]
    assert s.values["features.2"][c] == pytest.approx(10 ** (-sqnr / 10), rel=1e-9)
    assert s.values["features.2"][FP32] == 0.0 and math.isfinite(sqnr)
    ev.close()


class _LinearHead(nn.Module):
    """Linear layers with nothing between them: the network after `first` is linear, so a
    second-order estimate of the output change is the change itself."""

    def __init__(self, outputs: int):
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(64, 16)
        self.second = nn.Linear(16, 8)
        self.head = nn.Linear(8, outputs)

    def forward(self, x):
        return self.head(self.second(self.first(torch.flatten(x, 1))))


def _linear_head_evaluator(outputs: int, kind: str, batches: int = 3) -> Evaluator:
    task = _small_task(_LinearHead(outputs), kind, batches)
    return Evaluator(task, analyze(task.model, task.example_input), cache_dir=None)


def test_fisher_is_exact_for_one_linear_output():
    """One output, linear after the layer: every probe is +-1, (r J d)^2 = (J d)^2, so the
    estimate of the normalized MSE equals the exact value (hand-derived: see the module doc)."""
    ev = _linear_head_evaluator(1, "other")
    options = {f: [LayerChoice(w, P.INT8) for w in (P.INT2, P.INT4, P.INT8)] for f in ("first", "second")}
    fisher = measure_sensitivity(ev, options, batches=3)
    exact = measure_sensitivity(ev, options, batches=3, method="exact")
    assert fisher.path == "fisher" and exact.path == "suffix" and fisher.measure == "normalized_mse"
    for fqn, per in options.items():
        for c in per:
            assert exact.values[fqn][c] > 0
            assert fisher.values[fqn][c] == pytest.approx(exact.values[fqn][c], rel=1e-4), (fqn, c)
    ev.close()


def test_fisher_estimates_a_small_kl_without_bias():
    """Ten classes, linear after the layer, a small (int8) change: KL = 1/2 dz^T (diag p - p p^T) dz
    to third order, and the probes' mean converges to it (400 probes: ~1% standard error)."""
    ev = _linear_head_evaluator(10, "classifier")
    options = {"first": [LayerChoice(P.INT8, P.INT8)], "second": [LayerChoice(P.INT8, P.FP32)]}
    fisher = measure_sensitivity(ev, options, batches=3, probes=400)
    exact = measure_sensitivity(ev, options, batches=3, method="exact")
    for fqn, (c,) in options.items():
        assert 0 < exact.values[fqn][c] < 1e-3
        assert fisher.values[fqn][c] == pytest.approx(exact.values[fqn][c], rel=0.05), fqn
    ev.close()


def _metric_from_probes(counts: list[int], p: torch.Tensor, seed: int) -> torch.Tensor:
    """sum_k w_k r_k r_k^T per sample, from the "fisher" probes of logits log(p)."""
    runner = SimpleNamespace(measure="kl_to_fp32")
    vectors, weights = _FisherRunner._probes(
        runner, p.log(), torch.Generator().manual_seed(seed), torch.tensor(counts), torch.ones(len(counts), dtype=torch.float64)
    )
    return sum(w[:, None, None] * r[:, :, None] * r[:, None, :] for r, w in zip(vectors, weights, strict=True))


def test_probes_give_the_kl_metric_exactly_when_they_cover_the_classes():
    """Four classes, four or eight probes: the Walsh-Hadamard sign patterns cancel every cross
    term, so sum_k w_k r_k r_k^T is diag(p) - p p^T itself, whatever the random signs; one probe
    gives it only on average (4000 draws)."""
    p = torch.tensor([[0.7, 0.2, 0.06, 0.04], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    metric = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    for seed in range(3):
        assert torch.allclose(_metric_from_probes([4, 8], p, seed), metric, atol=1e-12)
    mean = sum(_metric_from_probes([1, 1], p, seed) for seed in range(4000)) / 4000
    assert torch.allclose(mean, metric, atol=0.02)
    assert not torch.allclose(_metric_from_probes([1, 1], p, 0), metric, atol=0.02)


def test_fisher_keeps_about_half_a_large_pool_without_bias(monkeypatch):
    """160 samples (more than DEFAULT_SAMPLES = 64): about 80 kept, each with weight 1 / its
    chance of being kept, so that the weighted trace sum over the kept ones is the pool's on
    average; and the estimate, over 100 seeds, averages to the exact KL measured on every sample
    of the pool (one seed's is off by 20-30% here: 80 samples of 160, and the trace is a weak
    guide to these random logits' KL)."""
    ev = _linear_head_evaluator(10, "classifier", batches=10)
    ref = torch.cat(ev.reference_outputs)
    p = torch.softmax(ref.double(), dim=-1)
    trace = (p * (1 - p)).sum(-1)
    runner = SimpleNamespace(measure="kl_to_fp32", probes=4)
    sums, kept = [], []
    for seed in range(200):
        counts, weight = _FisherRunner._plan(runner, ref, torch.Generator().manual_seed(seed))
        assert bool(((counts > 0) == (weight > 0)).all()) and bool((weight[counts > 0] >= 1).all())
        assert set(counts[counts > 0].tolist()) <= {1, 2, 4, 8, 16, 32}
        kept.append(int((counts > 0).sum()))
        sums.append(float((weight * trace).sum()))
    assert 75 <= sum(kept) / len(kept) <= 85
    assert sum(sums) / len(sums) == pytest.approx(float(trace.sum()), rel=0.02)
    options = {"first": [LayerChoice(P.INT8, P.INT8)], "second": [LayerChoice(P.INT4, P.INT8)]}
    exact = measure_sensitivity(ev, options, batches=10, method="exact")
    means = dict.fromkeys(options, 0.0)
    for seed in range(100):
        monkeypatch.setattr(sensitivity, "PROBE_SEED", seed)
        fisher = measure_sensitivity(ev, options, batches=10, probes=16)
        for fqn, (c,) in options.items():
            means[fqn] += fisher.values[fqn][c] / 100
    for fqn, (c,) in options.items():
        assert means[fqn] == pytest.approx(exact.values[fqn][c], rel=0.1), fqn
    ev.close()


def test_fisher_chunks_follow_the_probe_counts_across_batches_that_concatenate():
    """The kept samples (count > 0) in descending count order, `size` at a time: across batches
    of equal shapes, within each batch where they differ (tokens padded per batch)."""
    a = torch.arange(4.0).reshape(2, 2)
    b = torch.arange(10.0, 16.0).reshape(3, 2)
    counts = torch.tensor([2, 0, 1, 4, 1])
    chunks = _chunks([a, b], counts, 2)
    assert [idx.tolist() for _, idx in chunks] == [[3, 0], [2, 4]]
    assert [x.tolist() for x, _ in chunks] == [[[12.0, 13.0], [0.0, 1.0]], [[10.0, 11.0], [14.0, 15.0]]]
    ids = (torch.zeros(2, 5), torch.ones(3, 7))
    masks = (torch.zeros(2, 5) + 2, torch.ones(3, 7) + 2)
    chunks = _chunks([(ids[0], masks[0]), (ids[1], masks[1])], counts, 2)
    assert [idx.tolist() for _, idx in chunks] == [[0], [3, 2], [4]]
    assert [tuple(t.shape for t in x) for x, _ in chunks] == [
        ((1, 5), (1, 5)), ((2, 7), (2, 7)), ((1, 7), (1, 7))
    ]


def test_fisher_ranks_digits_pairs_as_exact_does(digits):
    """On a real CNN (ReLUs, pooling, depthwise convolutions) with the defaults (half the 240
    samples of the pool, two probes each on average): the same order within each layer; int8 and
    int4 within a factor of 2.5 of the exact values on the pool (the probes and the choice of
    samples add noise); int2, a change beyond the second-order range on these confident outputs,
    no higher than twice the exact value and at least a tenth of it; reproducible; the model left
    as it was (in-place ReLUs, gradients of parameters)."""
    _, _, ev, options = digits
    flags = {name: m.inplace for name, m in ev.model.named_modules() if hasattr(m, "inplace")}
    fisher = measure_sensitivity(ev, options)
    exact = measure_sensitivity(ev, options, method="exact", batches=fisher.batches)
    assert fisher.batches == 2
    assert fisher.path == "fisher" and fisher.note == ""
    int2, int4, int8 = (LayerChoice(w, P.INT8) for w in (P.INT2, P.INT4, P.INT8))
    for fqn, per in options.items():
        assert fisher.values[fqn][FP32] == 0.0
        assert fisher.values[fqn][int2] > fisher.values[fqn][int4] > fisher.values[fqn][int8] > 0
        for c in per:
            if c != FP32:
                low = 0.1 if c.weight == P.INT2 else 0.4
                assert low < fisher.values[fqn][c] / exact.values[fqn][c] < (2.0 if c.weight == P.INT2 else 2.5), (fqn, c)
    assert measure_sensitivity(ev, options).values == fisher.values
    assert {name: m.inplace for name, m in ev.model.named_modules() if hasattr(m, "inplace")} == flags
    assert all(p.requires_grad for p in ev.model.parameters())
    assert not ev._active and not ev._active_delta
