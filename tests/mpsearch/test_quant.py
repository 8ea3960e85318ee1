"""Quantizer error bounds per bit width."""

import pytest
import torch

from hw_models import Precision
from mpsearch.quant import MinMaxObserver, act_params, int_range, quantize_weight, weight_scales

P = Precision


@pytest.mark.parametrize("prec", [P.INT2, P.INT3, P.INT4, P.INT6, P.INT8])
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


def test_more_bits_less_error():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    errs = [float((quantize_weight(w, p) - w).pow(2).mean()) for p in (P.INT2, P.INT3, P.INT4, P.INT6, P.INT8)]
    assert errs == sorted(errs, reverse=True)
    assert torch.equal(quantize_weight(w, P.FP32), w)
    assert float((quantize_weight(w, P.FP16) - w).abs().max()) < 1e-2


def test_int_ranges():
    assert int_range(4, signed=True) == (-7, 7)
    assert int_range(2, signed=True) == (-1, 1)
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
