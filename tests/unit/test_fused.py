"""The numba kernels of :mod:`outlierlab.fused` against float64 numpy, and
:meth:`StatsAccumulator.add_point` through them against the torch/numpy ops (issue 24 item 4)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outlierlab import fused
from outlierlab.stats import StatsAccumulator

pytest.importorskip("numba")


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.delenv(fused.ENV, raising=False)
    monkeypatch.setattr(fused, "_kernels", None)
    assert fused.available()


def rows(n: int, d: int, seed: int, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * rng.uniform(0.1, 10, size=d) + rng.normal(size=(n, 1))
    return np.ascontiguousarray(x.astype(dtype))


@pytest.mark.parametrize("n", [1, 2, 7, 64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_point_sums_equal_float64_numpy(n, dtype):
    x = rows(n, 13, seed=n, dtype=dtype)
    x[n // 2] = 0.0  # a zero row: in the sums, not counted for cos-sim
    start = np.random.default_rng(0).standard_normal((3, 13))  # adds to what is there
    sums = start.copy()
    index = np.arange(0, n, 2)
    t, nonzero = fused.point_sums(x, sums, index)
    x64 = x.astype(np.float64)
    mu = x64.mean(1)
    np.testing.assert_allclose(sums[0] - start[0], x64.sum(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sums[1] - start[1], x64.T @ mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(sums[2] - start[2], (x64**2).sum(0), rtol=1e-12, atol=1e-12)
    norms = np.linalg.norm(x64[index], axis=1)
    keep = norms > 0
    u = x64[index][keep] / norms[keep, None]
    assert t.dtype == dtype
    np.testing.assert_allclose(t, u.sum(0), rtol=1e-5, atol=1e-5)
    assert nonzero == int(keep.sum())


def test_point_sums_all_rows_and_no_rows():
    x = rows(9, 5, seed=1)
    t_all, nz_all = fused.point_sums(x, np.zeros((3, 5)), None)
    t_none, nz_none = fused.point_sums(x, np.zeros((3, 5)), np.empty(0, dtype=np.int64))
    x64 = x.astype(np.float64)
    u = x64 / np.linalg.norm(x64, axis=1, keepdims=True)
    np.testing.assert_allclose(t_all, u.sum(0), rtol=1e-5, atol=1e-5)
    assert nz_all == 9 and nz_none == 0 and not t_none.any()


def test_nan_and_inf_rows_pass_on_as_in_the_ops():
    x = rows(6, 4, seed=2)
    x[3, 1] = np.nan
    sums = np.zeros((3, 4))
    t, _ = fused.point_sums(x, sums, None)
    assert np.isnan(sums[:, 1]).all() and np.isnan(t).all()
    x = rows(6, 4, seed=2)
    x[1, 0] = np.inf
    t, _ = fused.point_sums(x, np.zeros((3, 4)), None)
    assert np.isnan(t[0])  # inf · (1/|x| = 0), as the torch path's Xᵀ(1/|x|)


def test_gather_abs():
    x = rows(20, 6, seed=3)
    index = np.array([19, 0, 5, 5])
    np.testing.assert_array_equal(fused.gather_abs(x, index), np.abs(x[index]))


def test_env_and_missing_numba_turn_the_kernels_off(monkeypatch):
    monkeypatch.setenv(fused.ENV, "0")
    monkeypatch.setattr(fused, "_kernels", None)
    assert not fused.available()
    with pytest.raises(RuntimeError, match="numba"):
        fused.point_sums(rows(3, 2, 0), np.zeros((3, 2)), None)
    monkeypatch.delenv(fused.ENV)
    monkeypatch.setattr(fused, "_kernels", None)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises ImportError
    monkeypatch.delitem(sys.modules, "outlierlab._fused_kernels", raising=False)
    assert not fused.available()


FIELDS = ("kurtosis", "kurtosis_authors", "corr_authors", "mmr", "cos_sim", "tokens")


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 90),
    d=st.integers(2, 24),  # d = 1: token-centred values are 0, the metrics 0/0
    mmr_n=st.one_of(st.none(), st.integers(1, 60)),
    cos_n=st.one_of(st.none(), st.integers(2, 60)),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_add_point_fused_equals_the_ops(n, d, mmr_n, cos_n, double, seed):
    x = torch.from_numpy(rows(n, d, seed, np.float64 if double else np.float32))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fast = StatsAccumulator(d, extras=False, authors=True)
    assert fast._fusable(x)
    fast.add_point(x, order, mmr_n, cos_n).add_point(x[: n // 2 + 1])  # two forwards
    saved, fused._kernels = fused._kernels, False
    try:
        ops = StatsAccumulator(d, extras=False, authors=True)
        assert not ops._fusable(x)
        ops.add_point(x, order, mmr_n, cos_n).add_point(x[: n // 2 + 1])
    finally:
        fused._kernels = saved
    a, b = fast.result(), ops.result()
    for k in FIELDS:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6, nan_ok=True), k
    assert a["outlier_neurons"] == b["outlier_neurons"]


def test_add_point_needs_the_order_to_subsample():
    with pytest.raises(ValueError, match="order"):
        StatsAccumulator(4).add_point(torch.ones(10, 4), None, mmr_n=3)


def test_bad_arguments_are_refused_not_read_past():
    x = rows(5, 3, seed=4)
    with pytest.raises(IndexError):
        fused.point_sums(x, np.zeros((3, 3)), np.array([0, 5]))
    with pytest.raises(IndexError):
        fused.gather_abs(x, np.array([-1]))
    with pytest.raises(ValueError, match="sums"):
        fused.point_sums(x, np.zeros((3, 4)), None)
    with pytest.raises(ValueError, match="contiguous"):
        fused.point_sums(np.asfortranarray(rows(5, 3, seed=4)), np.zeros((3, 3)), None)


def causal_entropy_numpy(z: np.ndarray) -> float:
    """Σ over causal rows (query i sees keys j ≤ i + T_k − T_q) of −Σ p log p, in float64."""
    t_q, t_k = z.shape[-2:]
    seen = np.tril(np.ones((t_q, t_k), dtype=bool), t_k - t_q)
    z = np.where(seen, z.astype(np.float64), -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.nansum(-p * np.log(p)))


@settings(max_examples=40, deadline=None)
@given(
    t_q=st.integers(1, 40),
    extra=st.integers(0, 5),
    heads=st.integers(1, 3),
    scale=st.floats(0.0, 60.0),  # flat to one-hot rows (entropy collapse)
    seed=st.integers(0, 2**16),
)
def test_causal_entropy_sum_equals_float64_numpy(t_q, extra, heads, scale, seed):
    z = (scale * np.random.default_rng(seed).standard_normal((2, heads, t_q, t_q + extra)))
    z = z.astype(np.float32)
    total, n = fused.causal_entropy_sum(z)
    assert n == 2 * heads * t_q
    assert total == pytest.approx(causal_entropy_numpy(z), rel=1e-5, abs=1e-5 * n)
    assert 0 <= total <= sum(np.log(np.arange(1, t_q + 1) + extra)) * 2 * heads * (1 + 1e-6)


def test_causal_entropy_reads_only_the_seen_keys():
    z = np.random.default_rng(5).standard_normal((3, 6, 9)).astype(np.float32)
    want = causal_entropy_numpy(z)
    z[0, 1, 5] = np.nan  # key 5 of query 1 is in the future: never read
    z[2, 0, 8] = np.inf
    assert fused.causal_entropy_sum(z)[0] == pytest.approx(want, rel=1e-6)
    z[1, 0, 3] = -1e30  # a seen key of negligible weight, far below the exp's range
    assert fused.causal_entropy_sum(z)[0] == pytest.approx(causal_entropy_numpy(z), rel=1e-6)
    for bad in (np.nan, np.inf, -np.inf):
        y = z.copy()
        y[1, 4, 2] = bad  # seen: the sum is NaN, as the softmax's
        assert np.isnan(fused.causal_entropy_sum(y)[0])


def test_causal_entropy_refuses_what_it_cannot_read():
    assert fused.causal_entropy_sum(np.zeros((0, 4, 4), dtype=np.float32)) == (0.0, 0)
    with pytest.raises(ValueError, match="float32"):
        fused.causal_entropy_sum(np.zeros((2, 4, 4)))
    with pytest.raises(ValueError, match="contiguous"):
        fused.causal_entropy_sum(np.zeros((2, 4, 8), dtype=np.float32)[..., ::2])
    with pytest.raises(ValueError, match="T_k >= T_q"):
        fused.causal_entropy_sum(np.zeros((2, 5, 4), dtype=np.float32))
