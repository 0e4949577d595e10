"""The serving schemes of issue 22: FP8 E4M3 against a float64 hand rounding to the E4M3 grid,
group-wise W4 and GPTQ (against RTN, 16 bits, and one OBS column update by hand in float64),
the Hadamard constructions behind QuaRot, and the scheme table's validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from outlierlab.errors import ConfigError
from outlierlab.quant import SCHEMES, scheme
from outlierlab.quant.gptq import gptq_quantize
from outlierlab.quant.quantizers import (
    FP8_MAX,
    fake_quant,
    fp8_e4m3,
    minmax_range,
    quantize_fp8,
    quantize_weight_groups,
    scale_zero_point,
)
from outlierlab.quant.rotate import apply_hadamard, hadamard, hadamard_factors, rotation_matrix


def e4m3_reference(v: float) -> float:
    """Round v to E4M3 in float64 by hand: 3 mantissa bits, exponent bias 7 (normal exponents
    −6..8), subnormals with quantum 2^−9, round half to even, saturate at ±448."""
    if v == 0 or math.isnan(v):
        return v
    sign, a = math.copysign(1.0, v), abs(v)
    e = max(math.floor(math.log2(a)), -6)  # below 2^-6: the subnormal quantum 2^-9
    quantum = 2.0 ** (e - 3)
    r = round(a / quantum) * quantum  # Python's round: half to even
    return sign * min(r, FP8_MAX)


def test_fp8_matches_the_hand_rounded_grid_with_ties_subnormals_and_saturation():
    ties = [1 + 1 / 16, 1 + 3 / 16, 2 + 1 / 8, 2 + 3 / 8, 240.0 + 8, 3 * 2.0**-10, 2.0**-10]
    subnormal = [2.0**-9, 5 * 2.0**-10, 7 * 2.0**-9, 2.0**-7 + 2.0**-10, 1e-4]
    saturate = [447.0, 448.0, 460.0, 464.0, 480.0, 1e4, -1e6]
    g = torch.Generator().manual_seed(0)
    rand = (torch.randn(200, generator=g, dtype=torch.float64) * 30).tolist()
    values = ties + subnormal + saturate + rand + [-v for v in ties + subnormal] + [0.0]
    x = torch.tensor(values, dtype=torch.float64)
    got = fp8_e4m3(x.float()).double()
    want = torch.tensor([e4m3_reference(v) for v in values], dtype=torch.float64)
    assert torch.equal(got, want)
    assert e4m3_reference(1 + 1 / 16) == 1.0 and e4m3_reference(1 + 3 / 16) == 1.25  # to even
    assert e4m3_reference(3 * 2.0**-10) == 2.0**-8 and e4m3_reference(2.0**-10) == 0.0
    assert float(fp8_e4m3(torch.tensor(1e6))) == FP8_MAX  # saturates, no NaN


def test_fp8_scales_per_channel_and_token():
    w = torch.tensor([[1.0, -3.0, 0.5], [100.0, 7.0, -0.01]], dtype=torch.float64)
    got = quantize_fp8(w.float(), "channel").double()
    for r in range(2):
        s = w[r].abs().max().item() / FP8_MAX
        want = [e4m3_reference(v / s) * s for v in w[r].tolist()]
        np.testing.assert_allclose(got[r].numpy(), want, rtol=1e-6)
        assert got[r].abs().max().item() == pytest.approx(w[r].abs().max().item(), rel=1e-6)
    tok = quantize_fp8(w.float(), "token")  # rows of a 2-D activation are tokens: the same
    torch.testing.assert_close(tok, got.float())


def test_group_wise_ranges_with_a_narrower_last_group():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 10, generator=g, dtype=torch.float64)
    got = quantize_weight_groups(w, 4, False, 4, "minmax")  # groups of 4, 4 and the last 2
    for a, b in ((0, 4), (4, 8), (8, 10)):
        part = w[:, a:b]
        lo, hi = part.min(1, keepdim=True).values, part.max(1, keepdim=True).values
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
        s = (hi - lo) / 15
        z = torch.round(-lo / s)
        want = (torch.clamp(torch.round(part / s) + z, 0, 15) - z) * s
        torch.testing.assert_close(got[:, a:b], want, rtol=0, atol=1e-12)


def _correlated(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / d**0.5 + torch.eye(d)
    return torch.randn(n, 4, generator=g, dtype=torch.float64).repeat(1, d // 4) * 2 + (
        torch.randn(n, d, generator=g, dtype=torch.float64) @ mix)  # fmt: skip


@pytest.mark.parametrize("group", [None, 8])
def test_gptq_beats_rtn_on_correlated_inputs_and_is_exact_at_16_bits(group):
    x = _correlated(512, 32, 0)
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = 2 * x.T @ x
    q = gptq_quantize(w, h, 4, False, group)
    rtn = quantize_weight_groups(w, 4, False, group or 32, "minmax")
    err_gptq = (x @ w.T - x @ q.T).norm()
    err_rtn = (x @ w.T - x @ rtn.T).norm()
    assert err_gptq < 0.8 * err_rtn
    q16 = gptq_quantize(w, h, 16, False, group)
    torch.testing.assert_close(q16, w, rtol=0, atol=1e-4 * float(w.abs().max()))


def test_gptq_one_column_update_by_hand():
    """Two input columns, per-channel symmetric 3-bit: q_0 = Q(w_0); the OBS update
    w_1 ← w_1 − (w_0 − q_0) [H⁻¹]_01 / [H⁻¹]_00 with H = 2XᵀX + 1 % mean diag; q_1 = Q(w_1)."""
    x = _correlated(64, 4, 5)[:, :2]
    w = torch.tensor([[0.93, -0.31], [0.17, 0.74], [-1.13, 0.42]], dtype=torch.float64)
    h = 2 * x.T @ x
    got = gptq_quantize(w, h, 3, True)
    hd = h + 0.01 * torch.diagonal(h).mean() * torch.eye(2, dtype=torch.float64)
    hinv = np.linalg.inv(hd.numpy())
    scale = np.abs(w.numpy()).max(1) / 3  # per channel, grid ±3, range from the original W
    q0 = np.clip(np.round(w[:, 0].numpy() / scale), -3, 3) * scale
    w1 = w[:, 1].numpy() - (w[:, 0].numpy() - q0) * hinv[0, 1] / hinv[0, 0]
    q1 = np.clip(np.round(w1 / scale), -3, 3) * scale
    np.testing.assert_allclose(got.numpy(), np.stack([q0, q1], 1), rtol=0, atol=1e-12)
    assert np.abs(w1 - w[:, 1].numpy()).max() > 1e-3  # the error feedback did move column 1


def test_fake_quant_helpers_agree_with_gptq_scales():  # the per-channel range GPTQ starts from
    w = torch.randn(4, 6, dtype=torch.float64)
    s, z = scale_zero_point(*minmax_range(w, "channel"), 4, True)
    assert fake_quant(w, s, z, 4, True).shape == w.shape


@pytest.mark.parametrize("n", [1, 2, 4, 8, 12, 20, 24, 28, 36, 48, 60, 96, 576, 1536])
def test_hadamard_is_exact_in_integers(n):
    h = hadamard(n)
    assert h.dtype == torch.int64 and set(h.unique().tolist()) <= {-1, 1}
    assert torch.equal(h.T @ h, n * torch.eye(n, dtype=torch.int64))
    q = rotation_matrix(n)
    torch.testing.assert_close(q.T @ q, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def test_hadamard_factorisations_and_the_fast_transform():
    assert [f.shape[0] for f in hadamard_factors(576)] == [16, 36]  # SmolLM2's width
    assert [f.shape[0] for f in hadamard_factors(1536)] == [128, 12]  # and its MLP width
    assert hadamard(9) is None and hadamard(52) is None  # 52 = 4·13 needs GF(25): not built
    q = rotation_matrix(9)  # no Hadamard: a random orthogonal matrix instead
    torch.testing.assert_close(q @ q.T, torch.eye(9, dtype=torch.float64))
    x = torch.randn(3, 5, 576, dtype=torch.float64)
    f = [a.double() for a in hadamard_factors(576)]
    torch.testing.assert_close(apply_hadamard(x, f), x @ hadamard(576).double() / 24,
                               rtol=0, atol=1e-12)  # fmt: skip


def test_serving_schemes_and_bad_input():
    for name in ("fp8-tensor", "fp8-dynamic", "w4a16-rtn", "w4a16-gptq", "w4a4-quarot",
                 "smoothquant-search"):  # fmt: skip
        assert name in SCHEMES and scheme(name).name == name
    assert scheme("w4a16-gptq").w_group_size == 128 and scheme("w4a16-gptq").a_format == "none"
    assert scheme("w4a16-rtn", w_bits=8).name == "w4a16-rtn-w8a8"
    with pytest.raises(ConfigError, match=r"unknown scheme 'fp4'; allowed: .*fp8-tensor"):
        scheme("fp4")
    with pytest.raises(ConfigError, match="w_format must be one of int, fp8"):
        scheme("w8a8-tensor", w_format="fp16")
    with pytest.raises(ConfigError, match="w_group_size needs w_granularity channel"):
        scheme("w8a8-tensor", w_group_size=64)
    with pytest.raises(ConfigError, match="w_group_size must be a positive integer"):
        scheme("w4a16-rtn", w_group_size=0)
    with pytest.raises(ConfigError, match="not both"):
        scheme("smoothquant-search", smooth_alpha=0.5)
    with pytest.raises(ConfigError, match="rotation must be one of quarot"):
        scheme("w8a8-tensor", rotation="spin")
