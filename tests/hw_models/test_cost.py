"""Cost arithmetic checked against hand-computed values."""

import dataclasses
import itertools
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


def test_weights_are_priced_in_the_format_the_target_stores_them():
    """x86-vnni (ONNX Runtime) keeps int2 / int3 weights in INT4 and int6 in INT8."""
    cm = CostModel([CONV], X86)
    assert X86.rule(P.INT2, P.INT8).stored is P.INT4 and X86.rule(P.INT4, P.INT8).stored is P.INT4
    assert cm.layer_cost("conv", LayerChoice(P.INT2, P.INT8)).weight_bytes == 576 + 64  # 4 bits a weight
    assert cm.layer_cost("conv", LayerChoice(P.INT3, P.INT8)).weight_bytes == 576 + 64
    assert cm.layer_cost("conv", LayerChoice(P.INT6, P.INT8)).weight_bytes == 1152 + 64  # 8 bits a weight
    # the same cost as the wider grid: left out of the default space
    assert X86.default_weight_precisions == (P.INT4, P.INT8, P.FP32)
    # a target that stores what it runs prices the bits themselves
    bitfusion = CostModel([CONV], get_profile("bitfusion"))
    assert bitfusion.layer_cost("conv", LayerChoice(P.INT2, P.INT2)).weight_bytes == 288 + 64


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
    int8_rate = 2 * 2.5e9 * 2 * 64 * X86.efficiency["int8"]  # effective MAC/s
    assert c.compute_s == pytest.approx(115_200 / int8_rate)
    # weights 1216 B + input 800 B (int8) + output 1600*4 B
    assert c.memory_s == pytest.approx((1216 + 800 + 6400) / 20e9)
    assert c.latency_s == pytest.approx(max(c.compute_s, c.memory_s) + X86.layer_overhead_s)
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


def test_price_sums_layers_and_transitions_and_batch_scales_activations():
    cand = Candidate([("conv", LayerChoice(P.INT4, P.INT8)), ("fc", LayerChoice(P.FP32, P.FP32))])
    model = CostModel([CONV, FC], X86)
    cost = model.price(cand)
    parts = model.breakdown(cand)
    assert cost.feasible and cost.reason == ""
    # fp32 input -> int8 conv (800 input elements), int8 conv -> fp32 fc (64), fp32 output: none
    over, per = X86.transition_overhead_s, X86.transition_bytes_per_elem
    t_in = over + 800 * per / 20e9
    t_mid = over + 64 * per / 20e9
    assert cost.transitions == 2
    assert cost.transition_s == pytest.approx(t_in + t_mid)
    assert [p.transition_s for p in parts] == pytest.approx([t_in, t_mid])
    assert cost.latency_s == pytest.approx(sum(p.latency_s + p.transition_s for p in parts))
    assert cost.weight_bytes == 640 + 2560
    assert cost.bops == 115_200 * 32 + 640 * 1024
    # conv: 800 B int8 input + 1600 outputs read by the fc at fp32 (6400 B); fc: 256 + 40
    assert cost.peak_act_bytes == 800 + 6400
    batched = CostModel([CONV, FC], X86, batch_size=8).price(cand)
    assert batched.weight_bytes == cost.weight_bytes
    assert batched.peak_act_bytes == 8 * cost.peak_act_bytes
    assert batched.latency_s > cost.latency_s
    # int8 output read by an int8 layer is stored as int8
    both = Candidate([("conv", LayerChoice(P.INT8, P.INT8)), ("fc", LayerChoice(P.INT8, P.INT8))])
    c2 = model.price(both)
    assert c2.peak_act_bytes == 800 + 1600
    assert c2.transitions == 2  # in at the input, out at the output
    assert c2.transition_s == pytest.approx(t_in + over + 10 * per / 20e9)


def test_alternating_precisions_pay_for_every_switch():
    layers = [LayerSpec(f"l{i}", "conv2d", (32, 32, 1, 1), 1, 32 * 32 * 196, 32 * 196, 32 * 196) for i in range(6)]
    model = CostModel(layers, X86)
    i8, f32 = LayerChoice(P.INT8, P.INT8), LayerChoice(P.FP32, P.FP32)
    blocks = model.price(Candidate([(f"l{i}", i8 if i < 3 else f32) for i in range(6)]))
    alternating = model.price(Candidate([(f"l{i}", i8 if i % 2 == 0 else f32) for i in range(6)]))
    assert blocks.transitions == 2 and alternating.transitions == 6
    per_layer = sum(c.latency_s for c in model.breakdown(Candidate([(f"l{i}", i8 if i % 2 == 0 else f32)
                                                                     for i in range(6)])))
    assert alternating.latency_s - per_layer == pytest.approx(alternating.transition_s)
    assert alternating.latency_s > blocks.latency_s


def test_energy_by_hand():
    model = CostModel([FC], X86)
    c = model.layer_cost("fc", LayerChoice(P.FP32, P.FP32))
    moved = 2560 + 256 + 40
    assert c.energy_j == pytest.approx(640 * (3.7 + 0.9) * 1e-12 + moved * 160 * 1e-12)
    assert model.price(Candidate([("fc", LayerChoice(P.FP32, P.FP32))])).energy_j == pytest.approx(c.energy_j)


def test_microcontroller_memory_limits_make_configs_infeasible():
    m7 = get_profile("cortex-m7")
    big = LayerSpec("big", "linear", (1024, 1024), 1, 1024 * 1024, 1024, 1024)  # 1M weights
    model = CostModel([big], m7)
    fp32 = model.price(Candidate([("big", LayerChoice(P.FP32, P.FP32))]))
    assert not fp32.feasible and "4,194,304 bytes" in fp32.reason and "2,097,152" in fp32.reason
    int8 = model.price(Candidate([("big", LayerChoice(P.INT8, P.INT8))]))
    assert int8.feasible and int8.weight_bytes == 1024 * 1024 + 4 * 1024
    wide = LayerSpec("wide", "conv2d", (8, 8, 1, 1), 1, 64 * 100_000, 8 * 100_000, 8 * 100_000)
    act = CostModel([wide], m7).price(Candidate([("wide", LayerChoice(P.INT8, P.INT8))]))
    assert not act.feasible and "peak activations need 4,000,000 bytes" in act.reason  # 800k int8 + 3.2M fp32


def test_bitfusion_throughput_scales_with_bit_bricks():
    bf = get_profile("bitfusion")
    model = CostModel([CONV], bf)
    t = {(w, a): model.layer_cost("conv", LayerChoice(w, a)).compute_s
         for w in (P.INT2, P.INT3, P.INT4, P.INT8) for a in (P.INT2, P.INT4, P.INT8)}
    assert t[(P.INT3, P.INT4)] == t[(P.INT4, P.INT4)]  # 3 bits cost what 4 bits do
    assert t[(P.INT8, P.INT8)] == pytest.approx(16 * t[(P.INT2, P.INT2)])  # 4 x 4 bricks
    assert t[(P.INT4, P.INT8)] == pytest.approx(8 * t[(P.INT2, P.INT2)])
    assert t[(P.INT2, P.INT2)] == pytest.approx(115_200 / (8192 * 500e6 * 0.8))
    assert bf.rule(P.FP32, P.FP32) is None  # floats: unsupported, never priced as native


def test_h100_uses_dense_figures_and_int4_is_weight_only():
    h = get_profile("h100")
    assert h.peak_macs_per_s["int8"] * 2 == 1979e12 and h.peak_macs_per_s["fp8"] * 2 == 1979e12
    assert "3.35 TB/s" in h.sources["mem_bw_bytes_per_s"]  # the datasheet; the profile holds the fitted 3.1
    r = h.rule(P.INT4, P.BF16)
    assert r.compute == "fp16" and not r.native and r.kernel == "weight_only"
    assert h.rule(P.INT4, P.INT4) is None


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
    assert prof.rule(P.INT8, P.INT8) is not None
    for r in prof.rules:
        assert prof.peak_macs_per_s[r.compute] > 0
    for key in ("peak_macs_per_s", "mem_bw_bytes_per_s", "layer_overhead_s", "efficiency"):
        assert prof.sources.get(key)
    assert prof.mem_bw_bytes_per_s > 0 and prof.layer_overhead_s >= 0


def test_upper_bounds_cover_every_candidate_of_a_mixed_space():
    prof = dataclasses.replace(get_profile("x86-vnni"), transition_overhead_s=3e-6, transition_bytes_per_elem=8.0)
    layers = [CONV, FC, dataclasses.replace(FC, fqn="fc2", weight_shape=(10, 10), macs=100, in_elems=10)]
    cm = CostModel(layers, prof)
    pairs = [LayerChoice(P.INT8, P.INT8), LayerChoice(P.FP32, P.FP32), LayerChoice(P.INT4, P.INT8)]
    ub = cm.upper_bounds({x.fqn: pairs for x in layers})
    worst = {"latency_s": 0.0, "weight_bytes": 0, "bops": 0}
    for combo in itertools.product(pairs, repeat=len(layers)):
        c = cm.price(Candidate(zip([x.fqn for x in layers], combo, strict=True)))
        worst = {"latency_s": max(worst["latency_s"], c.latency_s), "weight_bytes": max(worst["weight_bytes"], c.weight_bytes),
                 "bops": max(worst["bops"], c.bops)}
    # weights and BOPs are sums of per-layer maxima: reached exactly by one candidate
    assert ub["weight_bytes"] == worst["weight_bytes"] and ub["bops"] == worst["bops"]
    # latency: alternating compute kinds pay conversions; the bound charges one at every boundary
    n_boundaries = len(layers) + 1
    assert worst["latency_s"] <= ub["latency_s"] <= worst["latency_s"] + n_boundaries * 3e-6 + 1e-4


def test_weight_only_rules_run_at_the_fp16_peak_with_their_kernel_efficiency():
    h100 = get_profile("h100")
    fc = LayerSpec("fc", "linear", (4096, 4096), 1, 4096 * 4096, 4096, 4096)
    rows = 8192  # compute-bound at any of these efficiencies
    macs = rows * 4096 * 4096
    fp16_peak = 989.5e12 / 2
    slow = dataclasses.replace(h100, efficiency={**h100.efficiency, "weight_only": 0.03})
    cm = CostModel([fc], slow, rows)
    assert cm.layer_cost("fc", LayerChoice(P.INT4, P.BF16)).compute_s == pytest.approx(macs / (fp16_peak * 0.03))
    assert cm.layer_cost("fc", LayerChoice(P.BF16, P.BF16)).compute_s == pytest.approx(
        macs / (fp16_peak * h100.efficiency["fp16"]))
    # a profile with no weight_only entry runs them at the fp16 efficiency
    no_entry = dataclasses.replace(h100, efficiency={k: v for k, v in h100.efficiency.items() if k != "weight_only"})
    cm = CostModel([fc], no_entry, rows)
    assert cm.layer_cost("fc", LayerChoice(P.INT4, P.BF16)).compute_s == pytest.approx(
        macs / (fp16_peak * h100.efficiency["fp16"]))
    # the int4 layer next to a bf16 one is no transition: both take bf16 activations on fp16 compute
    two = [fc, dataclasses.replace(fc, fqn="fc2")]
    cand = Candidate([("fc", LayerChoice(P.INT4, P.BF16)), ("fc2", LayerChoice(P.BF16, P.BF16))])
    assert CostModel(two, h100, 1).price(cand).transitions == 2  # fp32 input in, fp32 output out


def test_context_entries_price_a_layer_by_its_neighbours_kinds():
    from hw_models.profiles import LayerTable

    # conv: fp32 10 us; fc: fp32 3 us, int8 2 us; measured in context (conversions included)
    table = LayerTable({
        "conv": {"macs": CONV.macs, "fp32": 10e-6, "fp32>fp32>int8": 12e-6},
        "fc": {"macs": FC.macs, "fp32": 3e-6, "int8": 2e-6, "fp32>int8>fp32": 7e-6},
    }, batch_size=1, other_s=1e-6)
    prof = dataclasses.replace(X86, layer_table=table)
    cm = CostModel([CONV, FC], prof)
    fp32, int8 = LayerChoice(P.FP32, P.FP32), LayerChoice(P.INT8, P.INT8)
    # both contexts measured: 12 + 7 + other 1, no conversion added
    cost = cm.price(Candidate([("conv", fp32), ("fc", int8)]))
    assert cost.latency_s == pytest.approx(20e-6) and cost.transition_s == 0
    # no context entry: the per-layer table (10 + 3) and other 1
    assert cm.price(Candidate([("conv", fp32), ("fc", fp32)])).latency_s == pytest.approx(14e-6)
    # fc int8 measured in context, conv int8 not: conv's int8 roofline + its input conversion from the
    # fp32 model input; fc's context entry ("int8>int8>fp32") is missing too: its table time plus the
    # conversion of the model's output
    c = cm.price(Candidate([("conv", int8), ("fc", int8)]))
    conv8 = cm.layer_cost("conv", int8).latency_s
    assert c.latency_s == pytest.approx(conv8 + cm.transition_s(CONV.in_elems) + 2e-6 + cm.transition_s(FC.out_elems)
                                        + 1e-6)
    assert cm.upper_bounds({"conv": [fp32, int8], "fc": [fp32, int8]})["latency_s"] >= 12e-6 + 7e-6


def test_a_targets_precisions_come_in_one_order_in_every_process():
    """bf16 and fp16 are both 16-bit floats: sorted by kind and width alone, their order followed
    the set's hash order, which changes per process (PYTHONHASHSEED), and so did a search space's
    choices and a seeded search's proposals."""
    import subprocess
    import sys

    code = ("from hw_models import list_profiles\n"
            "for p in list_profiles(): print(p.name, [x.value for x in p.weight_precisions],"
            " [x.value for x in p.activation_precisions])")
    runs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in range(6)}
    assert len(runs) == 1
    assert "['int8', 'fp8_e4m3', 'bf16', 'fp16', 'fp32']" in runs.pop()  # h100: by kind, width, then name


def test_payload_counting_leaves_the_scales_out_of_weight_bytes_but_not_out_of_latency():
    assert weight_bytes(CONV, P.INT8, "payload") == 1152 and weight_bytes(FC, P.FP8_E4M3, "payload") == 640
    assert weight_bytes(CONV, P.FP32, "payload") == weight_bytes(CONV, P.FP32) == 1152 * 4
    with pytest.raises(ValueError, match="payload"):
        weight_bytes(CONV, P.INT8, "kernel")
    stored, payload = CostModel([CONV, FC], X86), CostModel([CONV, FC], X86, weight_counting="payload")
    cand = Candidate([("conv", LayerChoice(P.INT8, P.INT8)), ("fc", LayerChoice(P.INT4, P.INT8))])
    a, b = stored.price(cand), payload.price(cand)
    assert a.weight_bytes == (1152 + 64) + (320 + 40) and b.weight_bytes == 1152 + 320
    assert b.latency_s == a.latency_s  # the scales are moved all the same
    assert payload.layer_cost("conv", LayerChoice(P.INT8, P.INT8)).stored_bytes == 1152 + 64


def test_capacity_holds_the_stored_weights_whatever_is_counted():
    # 1M int8 weights need 1,048,576 payload bytes + 4,096 bytes of scales: a flash of 1,050,000
    # bytes holds the payload but not the weights as stored
    small = dataclasses.replace(get_profile("cortex-m7"), weight_capacity_bytes=1_050_000)
    big = LayerSpec("big", "linear", (1024, 1024), 1, 1024 * 1024, 1024, 1024)
    cand = Candidate([("big", LayerChoice(P.INT8, P.INT8))])
    for counting in ("with-scales", "payload"):
        cost = CostModel([big], small, weight_counting=counting).price(cand)
        assert not cost.feasible and "weights need 1,052,672 bytes" in cost.reason
