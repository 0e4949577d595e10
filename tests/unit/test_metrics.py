"""OF metrics (science §1): hand-computed tiny cases, a float64 numpy reference, properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from outlierlab import metrics as M

# --- float64 numpy references, written straight from docs/science.md §1 ---------------------------


def np_kurt(x):
    s2 = (x.reshape(-1, x.shape[-1]) ** 2).mean(0)
    return (s2**2).mean() / s2.mean() ** 2


def np_mmr(x):
    a = np.abs(x.reshape(-1, x.shape[-1]))
    return (a.max(1) / np.median(a, axis=1)).mean()


def np_cos(x):
    r = x.reshape(-1, x.shape[-1])
    u = r / np.linalg.norm(r, axis=1, keepdims=True)
    g = u @ u.T
    n = len(r)
    return (g.sum() - np.trace(g)) / (n * (n - 1))


def np_centred(x):
    r = x.reshape(-1, x.shape[-1])
    c = r - r.mean(1, keepdims=True)
    s2 = (c**2).mean(0)
    return np.var(s2 / s2.mean())


# --- hand-computed ---------------------------------------------------------------------------


def test_kurtosis_by_hand():
    assert M.kurtosis(torch.tensor([[1.0, 2.0], [3.0, 4.0]])) == pytest.approx(10 / 9)
    assert M.kurtosis(torch.tensor([[1.0, 0.0], [1.0, 0.0]])) == pytest.approx(2.0)
    assert math.isnan(M.kurtosis(torch.zeros(3, 4)))


def test_centred_kurtosis_by_hand():
    # centred rows are both [-0.5, 0.5]: equal RMS → Kurt 1 → centred variant 0
    assert M.kurtosis_centred(torch.tensor([[1.0, 2.0], [3.0, 4.0]])) == pytest.approx(0.0)
    x = torch.tensor([[3.0, -1.0, -1.0, -1.0]])  # already centred; s² = [9,1,1,1]
    assert M.kurtosis_centred(x) == pytest.approx((84 / 4) / 9 - 1)  # mean s⁴=21, mean s²=3


def test_mmr_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [-4.0, 1.0, 1.0]])
    assert M.max_median_ratio(x) == pytest.approx((3 / 2 + 4 / 1) / 2)
    # even width: median is the mean of the two middle values
    assert M.max_median_ratio(torch.tensor([[1.0, 2.0, 3.0, 10.0]])) == pytest.approx(4.0)


def test_cosine_and_feature_correlation_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert M.token_cosine_similarity(x) == pytest.approx(math.sqrt(2) / 3)
    # Σ_F = [[2,1],[1,1]]/2 → off-diagonal correlation 1/√2
    y = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    assert M.feature_correlation_rms(y) == pytest.approx(1 / math.sqrt(2))


def test_token_excess_kurtosis_by_hand():
    x = torch.tensor([[0.0] * 7 + [8.0], [1.0, -1.0] * 4])
    # row 1: centred [-1]*7+[7]: m2 = 7, m4 = 301 → 301/49 − 3; row 2: 1 − 3 < 0 → clipped to 0
    assert M.token_excess_kurtosis(x) == pytest.approx((301 / 49 - 3) / 2)


def test_outlier_neurons_and_share_above():
    x = torch.ones(10, 8)
    x[:, 5] = 20.0
    x[:, 2] = 7.0
    x[:, 6] = 5.0  # 5× median: not flagged at k = 6
    assert M.outlier_neurons(x) == [5, 2]
    assert M.outlier_neurons(x, k=4) == [5, 2, 6]
    assert M.share_above(x) == pytest.approx(20 / 80)
    assert M.share_above(x, 4.0) == pytest.approx(30 / 80)


# --- numpy reference on random data with planted outlier neurons -----------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_against_numpy_reference(dtype):
    g = np.random.default_rng(0)
    x = g.standard_normal((4, 33, 64))
    x[..., 7] *= 30.0
    x[..., 40] *= 12.0
    t = torch.tensor(x).to(dtype)
    ref = t.double().numpy()  # the values the metric actually sees
    tol = dict(rel=1e-9)
    assert M.kurtosis(t) == pytest.approx(np_kurt(ref), **tol)
    assert M.kurtosis(t) > 10
    assert M.max_median_ratio(t) == pytest.approx(np_mmr(ref), **tol)
    assert M.token_cosine_similarity(t, max_tokens=None) == pytest.approx(np_cos(ref), **tol)
    assert M.kurtosis_centred(t) == pytest.approx(np_centred(ref), **tol)
    assert M.outlier_neurons(t) == [7, 40]
    rms = np.sqrt((ref.reshape(-1, 64) ** 2).mean(0))
    np.testing.assert_allclose(M.neuron_rms(t).numpy(), rms, rtol=1e-12)


def test_cosine_subsample_is_seeded_and_bounded():
    x = torch.randn(500, 16) + 1.0
    a = M.token_cosine_similarity(x, max_tokens=50, seed=3)
    assert a == M.token_cosine_similarity(x, max_tokens=50, seed=3)
    assert a != M.token_cosine_similarity(x, max_tokens=50, seed=4)
    assert abs(a - M.token_cosine_similarity(x, max_tokens=None)) < 0.1


def test_initialisation_values():
    x = torch.randn(2048, 256)
    assert M.kurtosis(x) == pytest.approx(1.0, abs=0.01)
    assert M.kurtosis_centred(x) == pytest.approx(0.0, abs=0.01)
    assert abs(M.token_cosine_similarity(x)) < 0.01
    assert M.outlier_neurons(x) == []


# --- properties ------------------------------------------------------------------------------

_vals = st.floats(-1e3, 1e3, allow_nan=False, allow_subnormal=False).map(
    lambda v: 0.0 if abs(v) < 1e-6 else v
)
_mats = st.tuples(st.integers(1, 12), st.integers(1, 12)).flatmap(
    lambda s: arrays(np.float64, s, elements=_vals)
)


@settings(max_examples=60, deadline=None)
@given(_mats)
def test_kurtosis_bounds(x):
    t = torch.tensor(x)
    if not (x != 0).any():
        return
    k = M.kurtosis(t)
    assert 1 - 1e-9 <= k <= x.shape[1] * (1 + 1e-9)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, st.integers(1, 12), elements=_vals))
def test_kurtosis_one_for_equal_rms(v):
    if not (v != 0).any():
        return
    circ = np.stack([np.roll(v, i) for i in range(len(v))])  # every column holds the same values
    assert M.kurtosis(torch.tensor(circ)) == pytest.approx(1.0, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 20), st.data())
def test_kurtosis_d_for_single_live_neuron(d, n, data):
    j = data.draw(st.integers(0, d - 1))
    col = data.draw(arrays(np.float64, n, elements=st.floats(0.5, 100)))
    x = np.zeros((n, d))
    x[:, j] = col
    assert M.kurtosis(torch.tensor(x)) == pytest.approx(d, rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(_mats, st.floats(1e-3, 1e3), st.randoms(use_true_random=False))
def test_scale_and_permutation_invariance(x, c, rnd):
    if not (x != 0).any():
        return
    t = torch.tensor(x)
    rows = list(range(x.shape[0]))
    cols = list(range(x.shape[1]))
    rnd.shuffle(rows)
    rnd.shuffle(cols)
    p = t[rows][:, cols]
    k = M.kurtosis(t)
    for other in (c * t, -c * t, p):
        assert M.kurtosis(other) == pytest.approx(k, rel=1e-9)
    mmr = M.max_median_ratio(t)
    if math.isfinite(mmr):
        for other in (c * t, p):
            assert M.max_median_ratio(other) == pytest.approx(mmr, rel=1e-9)
    if x.shape[0] > 1 and (np.abs(x).sum(1) > 0).all():
        cs = M.token_cosine_similarity(t)
        assert M.token_cosine_similarity(p) == pytest.approx(cs, rel=1e-9, abs=1e-12)
        assert M.token_cosine_similarity(c * t) == pytest.approx(cs, rel=1e-9, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(_mats)
def test_mmr_at_least_one(x):
    a = np.abs(x)
    if (np.median(a, axis=1) == 0).any():
        return
    assert M.max_median_ratio(torch.tensor(x)) >= 1 - 1e-12
