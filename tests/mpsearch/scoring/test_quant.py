"""Quantizer error bounds per bit width."""

import math

import pytest
import torch

from hw_models import Precision
from mpsearch.scoring.quant import (
    ActQuantParams,
    FloatActQuantParams,
    HistogramObserver,
    MinMaxObserver,
    act_params,
    fake_quant_weight,
    int_range,
    quantize_weight,
    resolve_clipping,
    weight_qparams,
    weight_range,
    weight_scales,
)

P = Precision


@pytest.mark.parametrize("prec", [P.INT4, P.INT6, P.INT8])
def test_weight_error_at_most_half_a_step_per_channel(prec):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.linspace(0.1, 3, 16).reshape(-1, 1, 1, 1)
    q = quantize_weight(w, prec)
    scale = weight_scales(w, prec.bits)
    # symmetric min-max: scale = max|w| / (2^(b-1)-1), error <= scale/2 per element
    assert torch.allclose(scale, w.reshape(16, -1).abs().amax(1) / (2 ** (prec.bits - 1) - 1))
    err = (q - w).abs().reshape(16, -1).amax(1)
    assert torch.all(err <= scale / 2 + 1e-6)
    # at most 2^b - 1 distinct levels per channel
    assert all(len(torch.unique(q[c])) <= 2**prec.bits - 1 for c in range(16))
    # the channel maximum is representable exactly
    assert torch.allclose(q.reshape(16, -1).abs().amax(1), w.reshape(16, -1).abs().amax(1))


@pytest.mark.parametrize(("prec", "qmin", "qmax"), [(P.INT2, -2, 1), (P.INT3, -4, 3)])
def test_two_and_three_bit_weights_use_every_level_of_their_grid(prec, qmin, qmax):
    assert weight_range(prec.bits) == (qmin, qmax)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 8, 3, 3, generator=g) * torch.linspace(0.1, 3, 16).reshape(-1, 1, 1, 1)
    q = quantize_weight(w, prec, clipping="minmax")
    scale = weight_scales(w, prec.bits)
    rows = w.reshape(16, -1)
    # min-max: the smallest scale whose grid [qmin, qmax] x scale covers the channel's [min, max]
    assert torch.allclose(scale, torch.maximum(rows.amax(1) / qmax, rows.amin(1) / qmin))
    assert torch.all((q - w).abs().reshape(16, -1).amax(1) <= scale / 2 + 1e-6)  # nothing clipped
    levels = torch.round(q.reshape(16, -1) / scale.reshape(-1, 1))
    assert float(levels.min()) >= qmin and float(levels.max()) <= qmax
    # the 72 weights of a channel land on all 2^b levels (a symmetric grid has 2^b - 1)
    assert max(len(torch.unique(levels[c])) for c in range(16)) == 2**prec.bits


def test_int2_is_four_levels_by_hand():
    # one channel [-1.0, -0.4, 0.1, 0.5]: min-max scale max(0.5 / 1, -1.0 / -2) = 0.5; w / scale =
    # [-2, -0.8, 0.2, 1] -> levels [-2, -1, 0, 1]: the four levels of {-2, -1, 0, 1} x 0.5
    w = torch.tensor([[-1.0, -0.4, 0.1, 0.5]])
    assert torch.equal(quantize_weight(w, P.INT2, clipping="minmax"), torch.tensor([[-1.0, -0.5, 0.0, 0.5]]))
    assert float(weight_scales(w, 2)) == 0.5


def test_more_bits_less_error():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    errs = [
        float((quantize_weight(w, p) - w).pow(2).mean()) for p in (P.INT2, P.INT3, P.INT4, P.INT6, P.INT8)
    ]
    assert errs == sorted(errs, reverse=True)
    assert torch.equal(quantize_weight(w, P.FP32), w)
    assert float((quantize_weight(w, P.FP16) - w).abs().max()) < 1e-2


def test_int_ranges():
    assert int_range(4, signed=True) == (-7, 7)
    assert int_range(2, signed=True) == (-1, 1)
    assert weight_range(2) == (-2, 1) and weight_range(3) == (-4, 3) and weight_range(4) == (-7, 7)
    assert weight_range(8) == (-127, 127)
    assert int_range(8, signed=False) == (0, 255)


def test_activation_params_unsigned_after_relu_and_asymmetric():
    p = act_params(0.0, 2.55, 8)
    assert p.zero_point == 0 and p.scale == pytest.approx(0.01)
    x = torch.linspace(0, 2.55, 1000)
    assert float((p.fake_quant(x) - x).abs().max()) <= 0.005 + 1e-6
    q = act_params(-1.0, 3.0, 8)  # scale 4/255, zero point round(1/scale) = 64
    assert q.scale == pytest.approx(4 / 255) and q.zero_point == 64
    y = torch.linspace(-1, 3, 1000)
    assert float((q.fake_quant(y) - y).abs().max()) <= q.scale / 2 + 1e-6
    # values outside the calibrated range are clipped
    assert float(q.fake_quant(torch.tensor([10.0]))) == pytest.approx((255 - 64) * q.scale)


def test_observer_tracks_range():
    obs = MinMaxObserver()
    assert not obs.seen
    obs.observe(torch.tensor([0.5, 2.0]))
    obs.observe(torch.tensor([-1.0, 1.0]))
    assert (obs.lo, obs.hi) == (-1.0, 2.0)
    assert obs.params(P.FP32) is None
    assert obs.params(P.INT8).qmax == 255


def test_fast_int8_path_matches_torch_fake_quant():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, 5, 5, generator=g) * 3
    for lo, hi in [(-1.0, 3.0), (0.0, 2.55), (-7.3, 0.4)]:
        p = act_params(lo, hi, 8)
        ref = torch.fake_quantize_per_tensor_affine(x, p.scale, p.zero_point, 0, 255)
        assert torch.allclose(p.fake_quant(x), ref, atol=1e-6)
        xcl = x.contiguous(memory_format=torch.channels_last)
        assert torch.allclose(p.fake_quant(xcl), ref, atol=1e-6)


# -- weights: granularity, groups, clipping ------------------------------------------------
def test_per_tensor_and_per_channel_scales_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.1, 0.25, -0.6]])
    pc = weight_qparams(w, 4)  # qmax 7: one scale per row
    assert pc.shape == (2, 1)
    assert torch.allclose(pc, torch.tensor([[2 / 7], [0.6 / 7]]))
    pt = weight_qparams(w, 4, granularity="per_tensor")
    assert pt.shape == (1, 1) and float(pt) == pytest.approx(2 / 7)
    # per tensor, row 1 on the step 2/7: 0.1 -> 0, 0.25 -> 1 step (0.875), -0.6 -> -2 steps (-2.1)
    q = quantize_weight(w, P.INT4, granularity="per_tensor")
    assert torch.allclose(q[1], torch.tensor([0.0, 2 / 7, -4 / 7]))
    # per channel, row 1 on the step 0.6/7: 0.1 -> 1 step (1.17), 0.25 -> 3 steps (2.92), -0.6 exact
    q = quantize_weight(w, P.INT4)
    assert torch.allclose(q[1], torch.tensor([0.6 / 7, 1.8 / 7, -0.6]), atol=1e-6)
    # conv weights: [out, 1, 1, 1] per channel, [1, 1, 1, 1] per tensor
    c = torch.randn(5, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    assert weight_qparams(c, 8).shape == (5, 1, 1, 1)
    assert weight_qparams(c, 8, granularity="per_tensor").shape == (1, 1, 1, 1)
    assert torch.equal(weight_scales(c, 8), weight_qparams(c, 8).reshape(-1))


def test_group_wise_scales_by_hand():
    w = torch.tensor(
        [
            [1.0, 2.5, 3.0, 4.0, -8.0, 1.0, 0.0, 2.0],
            [0.5, 0.2, 0.0, -0.1, 0.0, 0.0, 0.0, -0.25],
        ]
    )
    s = weight_qparams(w, 4, group_size=4)
    assert s.shape == (2, 2, 1)  # [out, in // g, 1], against w.reshape(2, 2, 4)
    assert torch.allclose(s.reshape(2, 2), torch.tensor([[4 / 7, 8 / 7], [0.5 / 7, 0.25 / 7]]))
    q = fake_quant_weight(w, s, 4)
    assert q.shape == w.shape
    expected = torch.tensor(
        [
            [8 / 7, 16 / 7, 20 / 7, 4.0, -8.0, 8 / 7, 0.0, 16 / 7],  # 1.75->2, 4.375->4, 5.25->5, 7
            [0.5, 1.5 / 7, 0.0, -0.5 / 7, 0.0, 0.0, 0.0, -0.25],  # 7, 2.8->3, 0, -1.4->-1
        ]
    )
    assert torch.allclose(q, expected, atol=1e-6)
    assert torch.allclose(quantize_weight(w, P.INT4, group_size=4), expected, atol=1e-6)
    # finer groups never do worse than one scale per row here
    assert float((q - w).pow(2).sum()) < float((quantize_weight(w, P.INT4) - w).pow(2).sum())


def test_group_size_must_divide_the_input_dimension():
    w = torch.zeros(4, 100)
    with pytest.raises(ValueError, match=r"100.*32|32.*100"):
        weight_qparams(w, 4, group_size=32)
    with pytest.raises(ValueError, match="2-D"):
        quantize_weight(torch.zeros(4, 64, 1, 1), P.INT4, group_size=32)
    with pytest.raises(ValueError, match="per_channel"):
        weight_qparams(torch.zeros(4, 64), 4, granularity="per_tensor", group_size=32)


def _heavy_tailed(shape, seed):
    g = torch.Generator().manual_seed(seed)
    # Student-t with 3 degrees of freedom: normal / sqrt(chi2_3 / 3)
    z = torch.randn(*shape, generator=g)
    chi2 = torch.randn(3, *shape, generator=g).pow(2).sum(0)
    return z / (chi2 / 3).sqrt()


@pytest.mark.parametrize("kwargs", [{}, {"granularity": "per_tensor"}, {"group_size": 16}])
@pytest.mark.parametrize("clipping", ["minmax", "mse"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_weight_error_at_most_half_a_step_inside_the_range(bits, clipping, kwargs):
    w = _heavy_tailed((8, 64), seed=bits)
    s = weight_qparams(w, bits, clipping=clipping, **kwargs)
    q = fake_quant_weight(w, s, bits)
    qmin, qmax = weight_range(bits)  # [-2, 1] at 2 bits, [-4, 3] at 3, symmetric from 4 up
    step = s.expand(8, 4, 16).reshape(8, 64) if "group_size" in kwargs else s.expand_as(w)
    inside = (w <= qmax * step * (1 + 1e-6)) & (w >= qmin * step * (1 + 1e-6))
    assert torch.all((q - w).abs()[inside] <= step[inside] / 2 + 1e-6)
    # values beyond the clipping range land on the end level of their side
    assert torch.allclose(q[~inside], torch.where(w[~inside] > 0, qmax, qmin) * step[~inside])
    assert torch.allclose(q / step, torch.round(q / step), atol=1e-4)  # on the grid
    if clipping == "minmax":
        assert bool(inside.all())


@pytest.mark.parametrize("kwargs", [{}, {"group_size": 16}])
def test_mse_clipping_beats_minmax_on_heavy_tails(kwargs):
    w = _heavy_tailed((32, 128), seed=7)
    for bits in (3, 4):
        p = P(f"int{bits}")
        e_minmax = float((quantize_weight(w, p, **kwargs) - w).pow(2).sum())
        e_mse = float((quantize_weight(w, p, clipping="mse", **kwargs) - w).pow(2).sum())
        assert e_mse <= e_minmax
        if bits == 3:
            assert e_mse < 0.9 * e_minmax
    # the clipped scales are never above the min-max ones
    assert torch.all(weight_qparams(w, 3, clipping="mse", **kwargs) <= weight_qparams(w, 3, **kwargs) + 1e-9)


def test_mse_clipping_finds_the_grid_optimum():
    # brute force: every alpha of the grid, channel by channel
    w = _heavy_tailed((6, 64), seed=11)
    qmax = 3  # 3 bits
    alphas = torch.linspace(1.0, 0.2, 100)
    best = []
    for row in w:
        amax = row.abs().max()
        errs = [
            float(
                (torch.clamp(torch.round(row / (a * amax / qmax)), -qmax, qmax) * (a * amax / qmax) - row)
                .pow(2)
                .sum()
            )
            for a in alphas
        ]
        best.append(min(errs))
    got = (quantize_weight(w, P.INT3, clipping="mse") - w).pow(2).sum(1)
    assert torch.all(got <= torch.tensor(best) * 1.001 + 1e-9)


def test_auto_clipping_is_mse_at_low_bits_only():
    assert [resolve_clipping("auto", b) for b in (2, 3, 4, 6, 8)] == ["mse", "mse", "mse", "minmax", "minmax"]
    assert resolve_clipping("minmax", 2) == "minmax" and resolve_clipping("mse", 8) == "mse"
    w = _heavy_tailed((8, 32), seed=3)
    assert torch.equal(
        quantize_weight(w, P.INT4, clipping="auto"), quantize_weight(w, P.INT4, clipping="mse")
    )
    assert torch.equal(quantize_weight(w, P.INT8, clipping="auto"), quantize_weight(w, P.INT8))
    assert not torch.equal(quantize_weight(w, P.INT4, clipping="mse"), quantize_weight(w, P.INT4))


def test_fp8_weights_scaled_per_tensor():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(16, 32, generator=g) * 0.02
    q = quantize_weight(w, P.FP8_E4M3)
    amax = float(w.abs().max())
    assert float(q.abs().max()) == pytest.approx(amax, rel=1e-6)  # max|w| maps to 448 exactly
    normal = w.abs() >= amax * 2.0**-6 / 448  # e4m3 normal range after scaling
    rel = ((q - w).abs() / w.abs())[normal]
    assert float(rel.max()) <= 2.0**-4 + 1e-6  # 3 mantissa bits: half a step is 1/16
    assert 0.005 < float(rel.mean()) < 0.03
    # scaling makes it magnitude-free; a plain cast would flush these tiny weights to zero
    tiny = w * 1e-5
    assert torch.allclose(quantize_weight(tiny, P.FP8_E4M3), q * 1e-5, rtol=1e-5, atol=0)
    assert float(w.mul(1e-5).to(torch.float8_e4m3fn).float().abs().max()) == 0.0


def test_weight_validation():
    w = torch.randn(4, 8)
    for bits in (1, 9, 16):
        with pytest.raises(ValueError, match="bit width"):
            weight_qparams(w, bits)
    with pytest.raises(ValueError, match="not supported"):
        quantize_weight(w, P.INT16)
    with pytest.raises(ValueError, match="granularity"):
        quantize_weight(w, P.INT4, granularity="per_row")
    with pytest.raises(ValueError, match="clipping"):
        quantize_weight(w, P.INT4, clipping="kl")
    with pytest.raises(ValueError, match="clipping"):
        resolve_clipping("best", 4)
    bad = w.clone()
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_weight(bad, P.INT8)
    bad[1, 2] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        weight_qparams(bad, 4, clipping="mse")
    with pytest.raises(ValueError, match="broadcast"):
        fake_quant_weight(w, torch.ones(3, 1), 4)


def test_zero_weights_stay_zero():
    z = torch.zeros(4, 8)
    for p in (P.INT2, P.INT4, P.INT8, P.FP8_E4M3, P.FP16):
        for kw in ({}, {"clipping": "mse"}, {"group_size": 4}, {"granularity": "per_tensor"}):
            q = quantize_weight(z, p, **kw)
            assert torch.equal(q, z)


# -- activations ---------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_activation_error_at_most_half_a_step(bits):
    p = act_params(-1.0, 3.0, bits)
    assert p.qmax == 2**bits - 1 and p.scale == pytest.approx(4 / (2**bits - 1))
    x = torch.linspace(-1, 3, 10001)
    y = p.fake_quant(x)
    assert float((y - x).abs().max()) <= p.scale / 2 + 1e-6
    # every output is a level of the grid: (k - zero_point) * scale with k in [0, 2^b - 1]
    k = y.double() / p.scale + p.zero_point
    assert torch.allclose(k, torch.round(k), atol=1e-3)
    assert float(torch.round(k).min()) >= 0 and float(torch.round(k).max()) <= p.qmax
    assert len(torch.unique(y)) <= 2**bits


def test_16_bit_activations_are_far_more_precise_than_8_bit():
    x = torch.randn(4, 8, 6, 6, generator=torch.Generator().manual_seed(2)) * 2
    lo, hi = float(x.min()), float(x.max())
    e8 = float((act_params(lo, hi, 8).fake_quant(x) - x).abs().max())
    p16 = act_params(lo, hi, 16)
    xcl = x.contiguous(memory_format=torch.channels_last)
    y16 = p16.fake_quant(xcl)
    e16 = float((y16 - x).abs().max())
    assert e16 <= p16.scale / 2 + 1e-6  # (float32 ulp at |x| ~ 7 is 5e-7)
    assert e8 > 100 * e16
    assert y16.is_contiguous(memory_format=torch.channels_last)


def _two_pass(*batches, bins=2048):
    obs = HistogramObserver(bins)
    for b in batches:
        obs.observe(b)
    obs.start_histogram()
    for b in batches:
        obs.observe(b)
    return obs


def _sq_err(p, x):
    return float((p.fake_quant(x).double() - x.double()).pow(2).sum())


@pytest.fixture(scope="module")
def outlier_data():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(20000, generator=g), torch.tensor([1000.0])])
    return x, _two_pass(x)


def test_percentile_clips_an_outlier(outlier_data):
    x, obs = outlier_data
    bulk = x[:-1]
    for prec in (P.INT4, P.INT8):
        pm, pp = obs.params(prec), obs.params(prec, method="percentile")
        top_m, top_p = (pm.qmax - pm.zero_point) * pm.scale, (pp.qmax - pp.zero_point) * pp.scale
        assert top_m >= 999.9  # min-max keeps the outlier
        assert top_p < 10.0  # the 99.99th percentile of 20000 N(0,1) values is ~3.7
        assert _sq_err(pp, bulk) < 0.1 * _sq_err(pm, bulk)
    # fp8: the scale follows the clipped range too
    assert obs.params(P.FP8_E4M3, "percentile").scale < obs.params(P.FP8_E4M3).scale / 100


def test_percentile_matches_the_data_quantiles():
    x = torch.randn(50000, generator=torch.Generator().manual_seed(4))
    obs = _two_pass(x)
    width = (obs.hi - obs.lo) / obs.bins
    lo, hi = obs.clip_range(P.INT8, "percentile", 99.0)
    assert lo == pytest.approx(float(torch.quantile(x, 0.01)), abs=width)
    assert hi == pytest.approx(float(torch.quantile(x, 0.99)), abs=width)
    p = obs.params(P.INT8, method="percentile", percentile=99.0)
    assert p == act_params(lo, hi, 8)
    assert obs.clip_range(P.INT8, "minmax") == (float(x.min()), float(x.max()))
    # the 100th percentile is the min-max range
    assert obs.params(P.INT8, method="percentile", percentile=100) == obs.params(P.INT8)


def test_mse_range_beats_minmax(outlier_data):
    x, obs = outlier_data
    for prec in (P.INT4, P.INT8, P.INT16):  # narrowly: min-max is nearly optimal with 20000 values
        assert _sq_err(obs.params(prec, "mse"), x) < _sq_err(obs.params(prec), x)
    assert _sq_err(obs.params(P.FP8_E4M3, "mse"), x) <= _sq_err(obs.params(P.FP8_E4M3), x)
    lo, hi = obs.clip_range(P.INT8, "mse")
    assert lo <= 0 <= hi <= 1000
    # heavy tails at 4 bits: a large gain
    lap = _heavy_tailed((20000,), seed=9)
    o2 = _two_pass(lap)
    assert _sq_err(o2.params(P.INT4, "mse"), lap) < 0.5 * _sq_err(o2.params(P.INT4), lap)


def test_mse_range_finds_the_brute_force_optimum_after_relu():
    y = torch.randn(20000, generator=torch.Generator().manual_seed(6)).relu()
    obs = _two_pass(y)
    assert obs.zeros == int((y == 0).sum())
    for bits in (4, 8):
        p = obs.params(P(f"int{bits}"), "mse")
        assert p.zero_point == 0
        his = torch.linspace(0.3, float(y.max()), 300).tolist()
        best = min(_sq_err(act_params(0.0, h, bits), y) for h in his)
        assert _sq_err(p, y) <= best * 1.01


def test_histogram_over_batches_equals_one_batch():
    g = torch.Generator().manual_seed(8)
    batches = [torch.randn(3, 4, 5, 5, generator=g) * (i + 1) for i in range(4)]
    batches[1] = batches[1].contiguous(memory_format=torch.channels_last)
    many = _two_pass(*batches)
    one = _two_pass(torch.cat([b.reshape(-1) for b in batches]))
    assert (many.lo, many.hi) == (one.lo, one.hi)
    assert torch.equal(many.hist, one.hist) and float(many.hist.sum()) == 4 * 300
    for prec in (P.INT4, P.INT8, P.INT16, P.FP8_E4M3):
        for method in ("minmax", "percentile", "mse"):
            assert many.params(prec, method) == one.params(prec, method)


def test_constant_and_zero_activations():
    for value in (0.0, 3.0, -2.0):
        x = torch.full((2, 3, 4), value)
        obs = _two_pass(x, x)
        for prec in (P.INT4, P.INT8, P.INT16, P.FP8_E4M3):
            for method in ("minmax", "percentile", "mse"):
                p = obs.params(prec, method)
                assert math.isfinite(p.scale) and p.scale > 0
                assert torch.allclose(p.fake_quant(x), x, rtol=1e-6, atol=0)
    p = act_params(0.0, 0.0, 8)
    assert p.scale == 1.0 and p.zero_point == 0


def test_fp8_activations():
    x = torch.randn(8, 16, 4, 4, generator=torch.Generator().manual_seed(10)) * 5
    obs = MinMaxObserver()
    obs.observe(x)
    p = obs.params(P.FP8_E4M3)
    assert isinstance(p, ActQuantParams) and isinstance(p, FloatActQuantParams)
    amax = float(x.abs().max())
    assert p.scale == pytest.approx(amax / 448)
    y = p.fake_quant(x)
    assert float(y.abs().max()) == pytest.approx(amax, rel=1e-6)
    normal = x.abs() >= p.scale * 2.0**-6
    rel = ((y - x).abs() / x.abs())[normal]
    assert float(rel.max()) <= 2.0**-4 + 1e-6
    # out-of-range values saturate at the calibrated maximum instead of becoming nan
    assert float(p.fake_quant(torch.tensor([10 * amax]))) == pytest.approx(amax, rel=1e-6)
    # fp16 / bf16 activations are a plain cast
    h = obs.params(P.FP16)
    assert torch.equal(h.fake_quant(x), x.half().float())
    assert torch.equal(obs.params(P.BF16).fake_quant(x), x.bfloat16().float())


def test_activation_validation():
    with pytest.raises(ValueError, match="bit width"):
        act_params(-1, 1, 17)
    with pytest.raises(ValueError, match="bit width"):
        act_params(-1, 1, 1)
    with pytest.raises(ValueError, match="finite"):
        act_params(float("-inf"), 1, 8)
    obs = HistogramObserver()
    with pytest.raises(ValueError, match="first pass"):
        obs.start_histogram()
    with pytest.raises(ValueError, match="non-finite"):
        obs.observe(torch.tensor([1.0, float("nan")]))
    obs.observe(torch.tensor([-1.0, 2.0]))
    with pytest.raises(ValueError, match="histogram pass"):
        obs.params(P.INT8, method="percentile")
    obs.start_histogram()
    with pytest.raises(ValueError, match="non-finite"):
        obs.observe(torch.tensor([0.5, float("inf")]))
    obs.observe(torch.tensor([0.5, 5.0]))  # outside the frozen range: counted in the end bin
    assert float(obs.hist.sum()) == 2 and float(obs.hist[-1]) == 1
    with pytest.raises(ValueError, match="range method"):
        obs.params(P.INT8, method="kl")
    for p in (50, 100.5, -1):
        with pytest.raises(ValueError, match="percentile"):
            obs.params(P.INT8, method="percentile", percentile=p)
    assert obs.params(P.FP32, method="mse") is None


def test_act_fake_quant_of_a_channels_last_tensor_is_the_same_values_in_the_same_format():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(2, 5, 4, 3, generator=g) * 3).to(memory_format=torch.channels_last)
    for p in (ActQuantParams(0.05, 3, 0, 255), ActQuantParams(0.02, 0, -8, 7)):
        y = p.fake_quant(x)
        assert torch.equal(y, p.fake_quant(x.contiguous()))
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(y, torch.fake_quantize_per_tensor_affine(x.contiguous(), p.scale, p.zero_point, p.qmin, p.qmax))
