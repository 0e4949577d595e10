"""Known answers and bounds for the fake quantisers (science §4), checked in float64 by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from outlierlab.errors import ConfigError
from outlierlab.quant import QuantConfig, scheme
from outlierlab.quant.quantizers import (
    fake_quant,
    minmax_range,
    mse_range,
    percentile_range,
    qrange,
    quantize_dynamic,
    quantize_weight,
    scale_zero_point,
    sqnr_db,
)


def _q(x, lo, hi, bits, symmetric):
    scale, zero = scale_zero_point(torch.as_tensor(lo), torch.as_tensor(hi), bits, symmetric)
    return fake_quant(x, scale, zero, bits, symmetric), scale, zero


def test_int8_symmetric_per_tensor_by_hand():
    x = torch.tensor([0.0, 0.5, -1.27, 1.0, 0.0049, 0.006, -0.333], dtype=torch.float64)
    # max|x| = 1.27 → scale = 1.27 / 127 = 0.01; q = round(x / 0.01) · 0.01
    q, scale, zero = _q(x, x.min(), x.max(), 8, True)
    assert float(scale) == pytest.approx(0.01)
    assert float(zero) == 0.0
    expected = torch.tensor([0.0, 0.5, -1.27, 1.0, 0.0, 0.01, -0.33], dtype=torch.float64)
    torch.testing.assert_close(q, expected)
    # outside the range: clipped to ±127 · scale
    clipped = fake_quant(torch.tensor([2.0, -5.0], dtype=torch.float64), scale, zero, 8, True)
    torch.testing.assert_close(clipped, torch.tensor([1.27, -1.27], dtype=torch.float64))


def test_qrange_restricted_symmetric_and_asymmetric():
    assert qrange(8, True) == (-127, 127)
    assert qrange(8, False) == (0, 255)
    assert qrange(4, True) == (-7, 7)
    assert qrange(16, False) == (0, 65535)


@pytest.mark.parametrize(
    ("lo", "hi", "scale", "zero"),
    [
        (0.0, 2.55, 0.01, 0),  # non-negative (post-ReLU): z = 0
        (-0.5, 2.05, 0.01, 50),  # z = round(0.5 / 0.01)
        (-2.55, 0.0, 0.01, 255),  # non-positive: z at the top
        (1.0, 2.55, 0.01, 0),  # range widened to contain 0
        (-1.0, -0.5, 1.0 / 255, 255),
    ],
)
def test_asymmetric_zero_point(lo, hi, scale, zero):
    s, z = scale_zero_point(
        torch.tensor(lo, dtype=torch.float64), torch.tensor(hi, dtype=torch.float64), 8, False
    )
    assert float(s) == pytest.approx(scale)
    assert float(z) == zero
    x = torch.tensor([0.0, lo, hi], dtype=torch.float64)
    q = fake_quant(x, s, z, 8, False)
    assert float(q[0]) == 0.0  # zero is exact
    assert torch.all((q[1:] - x[1:]).abs() <= s / 2 + 1e-12)


@settings(max_examples=60, deadline=None)
@given(
    arrays(np.float64, st.integers(1, 64), elements=st.floats(-1e3, 1e3)),
    st.integers(2, 16),
    st.booleans(),
)
def test_error_at_most_half_a_step_inside_range(values, bits, symmetric):
    x = torch.from_numpy(values)
    q, scale, _ = _q(x, x.min(), x.max(), bits, symmetric)
    assert torch.all((x - q).abs() <= scale / 2 * (1 + 1e-9) + 1e-12)


def test_per_channel_and_per_token_shapes():
    w = torch.randn(6, 5, dtype=torch.float64)
    lo, hi = minmax_range(w, "channel")
    assert lo.shape == (6, 1)
    np.testing.assert_allclose(hi.squeeze(1).numpy(), w.numpy().max(1))
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    lo, hi = minmax_range(x, "token")
    assert hi.shape == (2, 3, 1)
    q = quantize_dynamic(x, 8, True, "token")
    step = x.abs().amax(-1, keepdim=True) / 127
    assert torch.all((x - q).abs() <= step / 2 + 1e-12)
    # each row's largest magnitude is exact under symmetric per-token quantisation
    idx = x.abs().argmax(-1, keepdim=True)
    torch.testing.assert_close(q.gather(-1, idx), x.gather(-1, idx))


def test_per_channel_weight_beats_per_tensor_with_one_large_row():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, generator=g, dtype=torch.float64)
    w[3] *= 50
    err_t = (quantize_weight(w, 4, True, "tensor", "minmax") - w)[torch.arange(16) != 3]
    err_c = (quantize_weight(w, 4, True, "channel", "minmax") - w)[torch.arange(16) != 3]
    assert err_c.pow(2).sum() * 30 < err_t.pow(2).sum()


def test_mse_search_never_worse_than_minmax_and_clips_heavy_tails():
    torch.manual_seed(0)
    w = torch.distributions.StudentT(2.0).sample((64, 64)).double()
    for gran in ("tensor", "channel"):
        e_mm = (quantize_weight(w, 4, True, gran, "minmax") - w).pow(2).sum()
        e_mse = (quantize_weight(w, 4, True, gran, "mse") - w).pow(2).sum()
        assert e_mse <= e_mm
    _, hi = mse_range(w, 4, True, "tensor")
    assert float(hi) < float(w.abs().max())  # heavy tails: the best range clips


def test_percentile_range_against_numpy():
    x = torch.randn(100_000, dtype=torch.float64)
    lo, hi = percentile_range(x, 99.0)
    np.testing.assert_allclose([float(lo), float(hi)], np.percentile(x.numpy(), [1.0, 99.0]))


def test_planted_outlier_per_tensor_error_grows_per_token_does_not():
    """An outlier confined to a few tokens: per-tensor static ranges degrade every token by an
    order of magnitude; per-token dynamic ranges leave the other tokens untouched."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 64, generator=g, dtype=torch.float64)
    planted = x.clone()
    planted[:8, 5] = 100.0
    rest = slice(8, None)

    def per_tensor(t):
        return _q(t, t.min(), t.max(), 8, False)[0]

    def per_token(t):
        return quantize_dynamic(t, 8, True, "token")

    for quant, grows in ((per_tensor, True), (per_token, False)):
        base = (quant(x) - x)[rest].pow(2).mean()
        worse = (quant(planted) - planted)[rest].pow(2).mean()
        if grows:
            assert worse >= 10 * base
        else:
            torch.testing.assert_close(worse, base)


def test_outlier_channel_on_every_token_hurts_per_token_too():
    """An outlier *feature* (large RMS on every token, science §1) defeats per-token ranges as
    well: this is what SmoothQuant migrates into the weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g, dtype=torch.float64)
    planted = x.clone()
    planted[:, 5] *= 100.0
    keep = torch.arange(64) != 5
    base = (quantize_dynamic(x, 8, True) - x)[:, keep].pow(2).mean()
    worse = (quantize_dynamic(planted, 8, True) - planted)[:, keep].pow(2).mean()
    assert worse >= 10 * base


def test_sqnr_db():
    assert sqnr_db(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_db(1.0, 0.0) == float("inf")


def test_config_validation_and_schemes():
    with pytest.raises(ConfigError, match=r"2\.\.16"):
        QuantConfig(w_bits=1)
    with pytest.raises(ConfigError, match=r"2\.\.16"):
        QuantConfig(a_bits=17)
    with pytest.raises(ConfigError, match="w_granularity"):
        QuantConfig(w_granularity="token")
    with pytest.raises(ConfigError, match="smooth"):
        QuantConfig(smooth_alpha=1.5)
    with pytest.raises(ConfigError, match="w8a8-tensor, w8a8-dynamic, w4a8, w8a4"):
        scheme("int8")
    assert scheme("w8a8-tensor") == QuantConfig()
    dyn = scheme("w8a8-dynamic")
    assert (dyn.w_granularity, dyn.a_granularity, dyn.a_symmetric) == ("channel", "token", True)
    wide = scheme("w8a8-tensor", w_bits=16, a_bits=16)
    assert wide.name == "w16a16-tensor" and wide.w_bits == 16
    assert scheme("w4a8").w_bits == 4 and scheme("w8a4").a_bits == 4
    with pytest.raises(ConfigError, match="unknown"):
        QuantConfig().replace(bogus=1)
