"""Model analysis: layers, per-sample counts (checked by hand), what is left out, handles."""

import json

import pytest
import torch
from torch import nn

from hw_models.layers import LayerSpec
from mpsearch.errors import TaskLoadError
from mpsearch.scoring.analysis import (
    NORMALIZATION,
    NOT_EXECUTED,
    IgnoredModule,
    ModelAnalysis,
    WeightHandle,
    analyze,
)


def only(analysis: ModelAnalysis) -> LayerSpec:
    assert len(analysis.layers) == 1
    return analysis.layers[0]


def counts(layer: LayerSpec) -> tuple[int, int, int]:
    return layer.macs, layer.in_elems, layer.out_elems


# -- convolutions and linear layers ----------------------------------------------------------


def test_conv2d_padding_stride():
    conv = nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1)
    layer = only(analyze(conv, torch.randn(1, 3, 32, 32)))
    # H_out = W_out = floor((32 + 2*1 - 3) / 2) + 1 = 16 -> out = 8*16*16 = 2048
    # MACs = out * (in_channels/groups) * kh*kw = 2048 * 3 * 9 = 55296; in = 3*32*32 = 3072
    assert layer == LayerSpec("", "conv2d", (8, 3, 3, 3), 1, 55296, 3072, 2048)


def test_grouped_conv():
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2)
    layer = only(analyze(conv, torch.randn(1, 4, 8, 8)))
    # out = 6*8*8 = 384; MACs = 384 * (4/2) * 9 = 6912; in = 4*8*8 = 256
    assert layer.weight_shape == (6, 2, 3, 3) and layer.groups == 2
    assert counts(layer) == (6912, 256, 384)


def test_depthwise_conv():
    conv = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8, bias=False)
    layer = only(analyze(conv, torch.randn(1, 8, 10, 10)))
    # out = 8*10*10 = 800; MACs = 800 * (8/8) * 9 = 7200; in = 800
    assert layer.weight_shape == (8, 1, 3, 3) and layer.groups == 8
    assert counts(layer) == (7200, 800, 800)


def test_conv1d():
    conv = nn.Conv1d(4, 6, kernel_size=5)
    layer = only(analyze(conv, torch.randn(1, 4, 20)))
    # L_out = 20 - 5 + 1 = 16 -> out = 6*16 = 96; MACs = 96 * 4 * 5 = 1920; in = 4*20 = 80
    assert layer == LayerSpec("", "conv1d", (6, 4, 5), 1, 1920, 80, 96)


def test_linear_2d_and_3d_inputs():
    lin = nn.Linear(10, 7)
    # [1, 10]: out = 7, MACs = 7*10 = 70, in = 10
    assert only(analyze(lin, torch.randn(1, 10))) == LayerSpec("", "linear", (7, 10), 1, 70, 10, 7)
    # [1, 5 tokens, 10]: out = 5*7 = 35, MACs = 35*10 = 350, in = 5*10 = 50
    assert counts(only(analyze(lin, torch.randn(1, 5, 10)))) == (350, 50, 35)
    # batch 4: the same per sample
    assert counts(only(analyze(lin, torch.randn(4, 5, 10)))) == (350, 50, 35)


# -- multi-head attention --------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


# E = 8, L = 5 tokens, self-attention:
#   in_proj  (3E, E) = (24, 8): MACs = 3 * L*E*E = 3*5*64 = 960; in = L*E = 40 (q, k, v one tensor);
#            out = 3 * L*E = 120
#   out_proj (8, 8): MACs = L*E*E = 320; in = out = L*E = 40
SELF_ATTN = {"attn.in_proj": ((24, 8), 960, 40, 120), "attn.out_proj": ((8, 8), 320, 40, 40)}


def _as_table(a: ModelAnalysis) -> dict:
    return {x.fqn: (x.weight_shape, x.macs, x.in_elems, x.out_elems) for x in a.layers}


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_mha_packed_in_proj(batch_first, batch):
    x = torch.randn(batch, 5, 8) if batch_first else torch.randn(5, batch, 8)
    a = analyze(SelfAttention(batch_first), x)
    assert a.fqns == ("attn.in_proj", "attn.out_proj")
    assert _as_table(a) == SELF_ATTN
    assert all(x.op == "linear" and x.groups == 1 for x in a.layers)
    assert a.unsupported == ()  # out_proj is never called by MHA, yet not reported as unexecuted


def test_mha_batch_first_false_inside_a_batch_first_model():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.attn = nn.MultiheadAttention(8, 2)  # batch_first=False

        def forward(self, x):  # x: [batch, tokens, 4]
            h = self.embed(x).transpose(0, 1)  # [tokens, batch, 8]
            return self.attn(h, h, h)[0]

    # batch = dim 0 of the input (the input does not go into the MHA directly)
    a1, a3 = analyze(M(), torch.randn(1, 5, 4)), analyze(M(), torch.randn(3, 5, 4))
    assert a1 == a3
    # embed: MACs = 5 tokens * 8 * 4 = 160, in = 20, out = 40
    assert _as_table(a1) == {"embed": ((8, 4), 160, 20, 40), **SELF_ATTN}


def test_mha_cross_attention_lengths_differ():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 6, 8)
    a = analyze(mha, (q, kv, kv))
    # L_q = 3, L_k = L_v = 6, E = 8: MACs = (3 + 6 + 6) * 8*8 = 960
    # in = query 3*8 + key (= value, counted once) 6*8 = 24 + 48 = 72; out = (3+6+6)*8 = 120
    # out_proj: MACs = 3*8*8 = 192, in = out = 3*8 = 24
    assert _as_table(a) == {"in_proj": ((24, 8), 960, 72, 120), "out_proj": ((8, 8), 192, 24, 24)}
    # three distinct tensors: all three counted; in = 24 + 48 + 48 = 120
    a = analyze(mha, (q, kv, kv.clone()))
    assert a.layer("in_proj").in_elems == 120


@pytest.mark.parametrize("batch_first", [True, False])
def test_mha_separate_qkv(batch_first):
    mha = nn.MultiheadAttention(8, 2, kdim=4, vdim=6, batch_first=batch_first)
    assert not mha._qkv_same_embed_dim
    b = 2
    if batch_first:
        q, k, v = torch.randn(b, 3, 8), torch.randn(b, 6, 4), torch.randn(b, 6, 6)
    else:
        q, k, v = torch.randn(3, b, 8), torch.randn(6, b, 4), torch.randn(6, b, 6)
    a = analyze(mha, (q, k, v))
    # E = 8, L_q = 3, L_k = L_v = 6, kdim = 4, vdim = 6
    # q_proj (8, 8): MACs = 3*8*8 = 192, in = 3*8 = 24, out = 3*8 = 24
    # k_proj (8, 4): MACs = 6*8*4 = 192, in = 6*4 = 24, out = 6*8 = 48
    # v_proj (8, 6): MACs = 6*8*6 = 288, in = 6*6 = 36, out = 6*8 = 48
    # out_proj (8, 8): MACs = 3*8*8 = 192, in = out = 24
    assert _as_table(a) == {
        "q_proj": ((8, 8), 192, 24, 24),
        "k_proj": ((8, 4), 192, 24, 48),
        "v_proj": ((8, 6), 288, 36, 48),
        "out_proj": ((8, 8), 192, 24, 24),
    }
    h = a.handles
    assert (h["q_proj"].param, h["k_proj"].param, h["v_proj"].param) == (
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
    )
    assert [h[f].input_arg for f in ("q_proj", "k_proj", "v_proj")] == [0, 1, 2]
    assert h["out_proj"].input_module is None


def test_mha_unbatched_input():
    mha = nn.MultiheadAttention(8, 2)
    x = torch.randn(5, 8)  # (L, E): one sample
    assert _as_table(analyze(mha, (x, x, x))) == {
        "in_proj": ((24, 8), 960, 40, 120),
        "out_proj": ((8, 8), 320, 40, 40),
    }


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("norm_first", [True, False])
def test_transformer_encoder(batch_first, norm_first):
    # In eval mode nn.TransformerEncoderLayer may bypass its submodules (fused fast path);
    # hooks turn that path off, so every projection is seen.
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=batch_first, norm_first=norm_first)
    enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    x3 = torch.randn(3, 5, 16) if batch_first else torch.randn(5, 3, 16)
    a = analyze(enc, x3)
    assert a == analyze(enc, x3[:1] if batch_first else x3[:, :1])  # batch found in dim 0 or 1
    per_layer = ("self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2")
    assert a.fqns == tuple(f"layers.{i}.{n}" for i in (0, 1) for n in per_layer)
    assert a.unsupported == ()
    assert {i.fqn for i in a.ignored} == {f"layers.{i}.norm{j}" for i in (0, 1) for j in (1, 2)}
    # linear1 (32, 16) on 5 tokens: MACs = 5*32*16 = 2560
    assert a.layer("layers.0.linear1").macs == 2560


# -- calls, order, batch ---------------------------------------------------------------------


def test_shared_module_called_twice():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.first = nn.Linear(4, 4)
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(self.first(self.shared(x)))

    a = analyze(M(), torch.randn(1, 4))
    # shared is first called before `first`; it appears once
    assert a.fqns == ("shared", "first")
    # each call: MACs = 4*4 = 16, in = 4, out = 4; two calls: 32, 8, 8
    assert counts(a.layer("shared")) == (32, 8, 8)
    assert counts(a.layer("first")) == (16, 4, 4)


def test_execution_order_not_registration_order():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 2)
            self.stem = nn.Conv2d(1, 2, 3, padding=1)
            self.mid = nn.Conv2d(2, 2, 1)

        def forward(self, x):
            return self.head(self.mid(self.stem(x)).flatten(1)[:, :8])

    a = analyze(M(), torch.randn(1, 1, 4, 4))
    assert [n for n, _ in M().named_children()] == ["head", "stem", "mid"]
    assert a.fqns == ("stem", "mid", "head")
    assert list(a.handles) == list(a.fqns)


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        h = self.dw(self.bn(self.conv(x)).relu())  # [B, 8, 4, 4]
        t = self.proj(h.flatten(2).transpose(1, 2))  # [B, 16, 8]
        t = self.attn(t, t, t)[0]
        return self.head(t.mean(1))


def test_batch_size_does_not_change_per_sample_counts():
    model = Mixed()
    a1 = analyze(model, torch.randn(1, 3, 8, 8))
    a4 = analyze(model, torch.randn(4, 3, 8, 8))
    assert a1 == a4
    assert a1.layers == a4.layers and a1.total_macs == a4.total_macs
    # conv: out 8*4*4 = 128, MACs = 128*3*9 = 3456; dw: 128*1*9 = 1152; proj: 16*8*8 = 1024;
    # attn in_proj: 3*16*64 = 3072, out_proj: 16*64 = 1024; head: 5*8 = 40
    assert a1.fqns == ("conv", "dw", "proj", "attn.in_proj", "attn.out_proj", "head")
    assert [x.macs for x in a1.layers] == [3456, 1152, 1024, 3072, 1024, 40]
    assert a1.total_macs == 3456 + 1152 + 1024 + 3072 + 1024 + 40
    assert a1.ignored == (IgnoredModule("bn", "BatchNorm2d", NORMALIZATION),)


def test_explicit_batch_size():
    lin = nn.Linear(10, 7)
    # the input holds 2 samples of 3 tokens each, flattened to [6, 10]: MACs = 6*7*10 / 2 = 210
    assert only(analyze(lin, torch.randn(6, 10), batch_size=2)).macs == 210


# -- what is left out -----------------------------------------------------------------------


def test_unsupported_modules_are_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.rnn = nn.LSTM(8, 8, batch_first=True)
            self.up = nn.ConvTranspose2d(1, 1, 2, stride=2)
            self.head = nn.Linear(8, 3)

        def forward(self, tokens):
            h, _ = self.rnn(self.emb(tokens))
            img = self.up(h[:, :, None, :4].mean(1, keepdim=True))
            return self.head(h[:, -1]) + img.mean()

    a = analyze(M(), torch.randint(0, 10, (2, 5)))
    assert a.fqns == ("head",)
    got = {u.fqn: u.type_name for u in a.unsupported}
    assert got == {"emb": "Embedding", "rnn": "LSTM", "up": "ConvTranspose2d"}
    assert all("unsupported" in u.reason and "weight" in u.reason for u in a.unsupported)


def test_handled_module_that_never_runs_is_reported():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)
            self.unused_attn = nn.MultiheadAttention(4, 1)

        def forward(self, x):
            return self.used(x)

    a = analyze(M(), torch.randn(1, 4))
    assert a.fqns == ("used",)
    assert [(u.fqn, u.type_name, u.reason) for u in a.unsupported] == [
        ("unused", "Linear", NOT_EXECUTED),
        ("unused_attn", "MultiheadAttention", NOT_EXECUTED),
    ]


def test_normalization_and_1d_weights_are_ignored():
    model = nn.Sequential(
        nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), nn.PReLU(), nn.Flatten(), nn.LayerNorm(16)
    )
    a = analyze(model, torch.randn(1, 2, 2, 2))
    assert a.fqns == ("0",)
    assert a.unsupported == ()
    assert [(i.fqn, i.type_name, i.reason) for i in a.ignored] == [
        ("1", "BatchNorm2d", NORMALIZATION),
        ("2", "GroupNorm", NORMALIZATION),
        ("3", "PReLU", "only 1-D weight parameters (no matrix multiply to quantize)"),
        ("5", "LayerNorm", NORMALIZATION),
    ]


def test_no_quantizable_layer_is_not_an_error():
    a = analyze(nn.ReLU(), torch.randn(2, 3))
    assert a.layers == () and a.total_macs == 0 and a.fqns == ()


def test_model_failure_raises_task_load_error_and_cleans_up():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(5, 2))
    model.train()
    model[0].eval()
    with pytest.raises(TaskLoadError, match="failed on its example input: RuntimeError"):
        analyze(model, torch.randn(1, 4))
    assert [m.training for m in model.modules()] == [True, False, True]
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_training_flags_restored_and_eval_mode_used():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4), nn.Linear(4, 4))
    model.train()
    model[2].eval()
    seen = []
    model[1].register_forward_hook(lambda m, i, o: seen.append(m.training))
    analyze(model, torch.randn(3, 4))
    assert seen == [False]
    assert [m.training for m in model.modules()] == [True, True, True, False, True]


# -- handles ---------------------------------------------------------------------------------


def _capture(h: WeightHandle, seen: list):
    def hook(mod, args, kwargs):
        arg = h.input_arg
        seen.append(args[arg] if isinstance(arg, int) else kwargs[arg])

    return h.input_module.register_forward_pre_hook(hook, with_kwargs=True)


def test_weight_handles_point_at_real_parameters_and_inputs():
    model = Mixed()
    x = torch.randn(2, 3, 8, 8)
    a = analyze(model, x)
    assert set(a.handles) == set(a.fqns)
    assert a.handles["conv"] == WeightHandle(model.conv, "weight", model.conv, 0)
    assert getattr(a.handles["conv"].module, a.handles["conv"].param) is model.conv.weight
    assert a.handles["dw"].weight is model.dw.weight
    assert a.handles["attn.in_proj"].weight is model.attn.in_proj_weight
    assert a.handles["attn.out_proj"].weight is model.attn.out_proj.weight
    assert a.handles["attn.out_proj"].input_module is None
    assert a.handles["attn.in_proj"].other_input_args == (1, 2)

    seen: dict[str, list] = {f: [] for f in ("conv", "proj", "attn.in_proj")}
    hooks = [_capture(a.handles[f], seen[f]) for f in seen]
    inner: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(m, inputs, output):
            inner.setdefault(name, inputs[0])

        return hook

    for name in ("proj", "attn"):
        hooks.append(getattr(model, name).register_forward_hook(keep(name)))
    with torch.no_grad():
        model(x)
    for hk in hooks:
        hk.remove()
    assert seen["conv"][0] is x
    assert seen["proj"][0] is inner["proj"]
    assert seen["attn.in_proj"][0] is inner["attn"]


def test_mha_called_with_keywords():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(query=x, key=x, value=x, need_weights=False)[0]

    model = M()
    x = torch.randn(2, 5, 8)
    a = analyze(model, x)
    assert _as_table(a) == SELF_ATTN
    h = a.handles["attn.in_proj"]
    assert (h.module, h.param, h.input_module, h.input_arg) == (
        model.attn,
        "in_proj_weight",
        model.attn,
        "query",
    )
    assert h.other_input_args == ("key", "value")
    seen: list = []
    _capture(h, seen)
    with torch.no_grad():
        model(x)
    assert seen[0] is x


# -- serialisation ---------------------------------------------------------------------------


def test_to_dict_round_trip():
    a = analyze(Mixed(), torch.randn(1, 3, 8, 8))
    d = json.loads(json.dumps(a.to_dict()))
    assert set(d) == {"layers", "unsupported", "ignored"}
    assert d["layers"][0] == {
        "fqn": "conv",
        "op": "conv2d",
        "weight_shape": [8, 3, 3, 3],
        "groups": 1,
        "macs": 3456,
        "in_elems": 192,
        "out_elems": 128,
    }
    back = ModelAnalysis.from_dict(d)
    assert back == a  # handles do not take part in equality
    assert "handles" not in repr(a)
    assert hash(back) == hash(a)


# -- a real model ----------------------------------------------------------------------------


def test_mobilenet_v2():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mobilenet_v2(weights=None)
    a = analyze(model, torch.randn(1, 3, 224, 224))
    n_conv = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    # 1 stem conv + 2 convs in the first inverted residual + 3 in each of the other 16 + 1 last
    # 1x1 conv = 52 convolutions, plus the classifier's linear layer
    assert (n_conv, n_linear) == (52, 1)
    assert len(a.layers) == 53
    assert a.fqns[0] == "features.0.0" and a.fqns[-1] == "classifier.1"
    assert a.unsupported == ()
    assert all(i.reason == NORMALIZATION for i in a.ignored) and len(a.ignored) == 52
    # torchvision lists 0.30 GFLOPS (MACs); exact count here: 300,774,272
    assert a.total_macs == 300_774_272
    assert abs(a.total_macs - 300.8e6) / 300.8e6 < 0.01
    stem = a.layers[0]
    # stem conv 3->32, 3x3, stride 2: out 32*112*112 = 401408; MACs = 401408 * 3 * 9 = 10838016
    assert counts(stem) == (10_838_016, 3 * 224 * 224, 401_408)
    # classifier.1: Linear(1280, 1000): MACs = 1000 * 1280
    assert counts(a.layers[-1]) == (1_280_000, 1280, 1000)
