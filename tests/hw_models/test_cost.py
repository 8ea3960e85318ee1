"""Cost arithmetic checked against hand-computed values."""

import math

import pytest

from hw_models import (
    PROFILES,
    Candidate,
    CostModel,
    LayerChoice,
    LayerSpec,
    Precision,
    UnknownProfileError,
    bops,
    get_profile,
    weight_bytes,
)

P = Precision
X86 = get_profile("x86-vnni")

# conv 3x3, 8 -> 16 channels, on a 10x10 output: weight 16*8*3*3 = 1152 elements,
# MACs = 16*10*10 outputs * 8*3*3 = 115200, in 8*10*10 = 800, out 16*100 = 1600.
CONV = LayerSpec("conv", "conv2d", (16, 8, 3, 3), 1, 115_200, 800, 1600)
# linear 64 -> 10: 640 weights, 640 MACs, in 64, out 10
FC = LayerSpec("fc", "linear", (10, 64), 1, 640, 64, 10)


def test_weight_bytes_include_per_channel_scales():
    assert weight_bytes(CONV, P.FP32) == 1152 * 4
    assert weight_bytes(CONV, P.INT8) == 1152 + 16 * 4  # one fp32 scale per output channel
    assert weight_bytes(CONV, P.INT4) == 576 + 64
    assert weight_bytes(CONV, P.INT3) == math.ceil(1152 * 3 / 8) + 64  # 432 + 64
    assert weight_bytes(FC, P.INT2) == 160 + 40
    assert weight_bytes(FC, P.FP16) == 1280
    assert weight_bytes(FC, P.FP8_E4M3) == 640 + 4  # per-tensor scale


def test_bops_are_macs_times_both_bit_widths():
    assert bops(CONV, LayerChoice(P.INT4, P.INT8)) == 115_200 * 32
    assert bops(FC, LayerChoice(P.FP32, P.FP32)) == 640 * 1024


def test_roofline_latency_by_hand():
    model = CostModel([CONV, FC], X86)
    c = model.layer_cost("conv", LayerChoice(P.INT8, P.INT8))
    int8_rate = 2 * 2.5e9 * 2 * 64 * 0.25  # effective MAC/s
    assert c.compute_s == pytest.approx(115_200 / int8_rate)
    # weights 1216 B + input 800 B (int8) + output 1600*4 B
    assert c.memory_s == pytest.approx((1216 + 800 + 6400) / 20e9)
    assert c.latency_s == pytest.approx(max(c.compute_s, c.memory_s) + 4e-6)
    f = model.layer_cost("fc", LayerChoice(P.FP32, P.FP32))
    assert f.memory_s == pytest.approx((2560 + 256 + 40) / 20e9)
    assert f.bound == "memory"


def test_int4_weights_are_not_priced_as_native_compute():
    model = CostModel([CONV], X86)
    w8 = model.layer_cost("conv", LayerChoice(P.INT8, P.INT8))
    w4 = model.layer_cost("conv", LayerChoice(P.INT4, P.INT8))
    assert w4.compute == w8.compute == "int8"
    assert w4.compute_s == w8.compute_s
    assert w4.weight_bytes < w8.weight_bytes
    assert X86.rule(P.INT4, P.INT8).native is False
    assert X86.rule(P.INT8, P.INT8).native is True


def test_price_sums_layers_and_batch_scales_activations():
    cand = Candidate([("conv", LayerChoice(P.INT4, P.INT8)), ("fc", LayerChoice(P.FP32, P.FP32))])
    model = CostModel([CONV, FC], X86)
    cost = model.price(cand)
    parts = model.breakdown(cand)
    assert cost.feasible and cost.reason == ""
    assert cost.latency_s == pytest.approx(sum(p.latency_s for p in parts))
    assert cost.weight_bytes == 640 + 2560
    assert cost.bops == 115_200 * 32 + 640 * 1024
    assert cost.peak_act_bytes == 800 + 6400
    batched = CostModel([CONV, FC], X86, batch_size=8).price(cand)
    assert batched.weight_bytes == cost.weight_bytes
    assert batched.peak_act_bytes == 8 * cost.peak_act_bytes
    assert batched.latency_s > cost.latency_s


def test_unsupported_pair_is_infeasible_with_reason():
    cand = Candidate([("conv", LayerChoice(P.INT4, P.FP16)), ("fc", LayerChoice(P.FP32, P.FP32))])
    cost = CostModel([CONV, FC], X86).price(cand)
    assert not cost.feasible
    assert "conv" in cost.reason and "fp16" in cost.reason


def test_unknown_target_lists_known():
    with pytest.raises(UnknownProfileError, match="x86-vnni"):
        get_profile("tpu-v9")


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_every_profile_is_complete(name):
    prof = PROFILES[name]
    assert prof.rule(P.FP32, P.FP32) is not None
    for r in prof.rules:
        assert prof.peak_macs_per_s[r.compute] > 0
    for key in ("peak_macs_per_s", "mem_bw_bytes_per_s", "layer_overhead_s", "efficiency"):
        assert prof.sources.get(key)
    assert prof.mem_bw_bytes_per_s > 0 and prof.layer_overhead_s >= 0
