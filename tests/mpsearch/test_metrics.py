"""Confidence intervals (mpsearch.metrics): the Wilson interval and standard errors by hand."""

import math

import pytest
import torch

from mpsearch import metrics


def test_wilson_interval_by_hand():
    # all 256 crops agree: [1 / (1 + z^2/256), 1], the set's resolution, not an empty [1, 1]
    z2 = metrics.Z95**2
    lo, hi = metrics.wilson_interval(1.0, 256)
    assert lo == pytest.approx(1 / (1 + z2 / 256), rel=1e-12) and lo == pytest.approx(0.98522, abs=1e-5)
    assert hi == 1.0
    # 50 of 100: the textbook 0.4038..0.5962
    lo, hi = metrics.wilson_interval(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert metrics.wilson_interval(0.0, 10)[0] == 0.0 and metrics.wilson_interval(0.0, 10)[1] > 0.2
    with pytest.raises(ValueError):
        metrics.wilson_interval(1.5, 10)
    with pytest.raises(ValueError):
        metrics.wilson_interval(0.5, 0)


def test_standard_error_by_hand():
    # sample sd of 1, 2, 3, 4 is sqrt(5/3); over sqrt(4)
    assert metrics.standard_error([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3) / 2, rel=1e-12)
    assert metrics.standard_error([2.0, 2.0]) == 0.0
    assert metrics.standard_error([1.0]) is None


def test_kl_per_sample_averages_to_the_kl():
    g = torch.Generator().manual_seed(0)
    out = [torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)]
    ref = [torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)]
    per = metrics.kl_per_sample(out, ref)
    assert per.shape == (8,) and bool((per >= 0).all())
    assert float(per.mean()) == pytest.approx(metrics.kl_divergence(out, ref), rel=1e-12)
    # one sample by hand: sum p (log p - log q)
    p, q = torch.softmax(ref[1][2].double(), 0), torch.softmax(out[1][2].double(), 0)
    assert float(per[7]) == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-9)
