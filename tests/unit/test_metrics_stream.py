"""StatsAccumulator: streaming equals one-shot for any split; merge; mask; cos averaging."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outlierlab import metrics as M
from outlierlab import stats as S
from outlierlab.stats import StatsAccumulator

KEYS = ("kurtosis", "kurtosis_centred", "mmr", "token_excess_kurtosis", "share_above_6",
        "kurtosis_authors", "corr_authors")


def one_shot(x):
    return {
        "kurtosis": M.kurtosis(x),
        "kurtosis_centred": M.kurtosis_centred(x),
        "mmr": M.max_median_ratio(x),
        "token_excess_kurtosis": M.token_excess_kurtosis(x),
        "share_above_6": M.share_above(x, 6.0),
        "kurtosis_authors": M.kurtosis_authors(x),
        "corr_authors": M.corr_authors(x),
        "outlier_neurons": M.outlier_neurons(x),
        "tokens": x.reshape(-1, x.shape[-1]).shape[0],
    }


def assert_same(res, ref):
    for k in KEYS:
        assert res[k] == pytest.approx(ref[k], rel=1e-10, abs=1e-12), k
    assert res["outlier_neurons"] == ref["outlier_neurons"]
    assert res["tokens"] == ref["tokens"]


def planted(n=200, d=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    x[:, 3] *= 25
    x[:, 30] *= 9
    return x


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 199), max_size=8, unique=True))
def test_any_split_equals_one_shot(cuts):
    x = planted()
    acc = StatsAccumulator(48)
    bounds = [0, *sorted(cuts), 200]
    for a, b in itertools.pairwise(bounds):
        acc.update(x[a:b])
    assert_same(acc.result(), one_shot(x))


def test_merge_equals_one_shot_and_shapes_are_free():
    x = planted().reshape(4, 50, 48)  # (..., d) input
    a = StatsAccumulator(48).update(x[:1])
    b = StatsAccumulator(48).update(x[1:])
    assert_same(a.merge(b).result(), one_shot(x))
    assert a.result()["outlier_neurons"] == [3, 30]


def test_mask_drops_padding():
    x = planted().reshape(10, 20, 48)
    mask = torch.ones(10, 20, dtype=torch.long)
    mask[:, 15:] = 0
    x[:, 15:] = 1e4  # garbage in padded positions must not count
    res = StatsAccumulator(48).update(x, mask).result()
    assert_same(res, one_shot(x[:, :15]))


def test_mmr_subsample_is_a_subset_estimate():
    x = planted(n=2000)
    res = StatsAccumulator(48).update(x, mmr_max_tokens=300, seed=1).result()
    assert res["tokens"] == 2000
    assert res["kurtosis"] == pytest.approx(M.kurtosis(x), rel=1e-10)
    assert res["mmr"] == pytest.approx(M.max_median_ratio(x), rel=0.1)
    assert res["mmr"] != pytest.approx(M.max_median_ratio(x), rel=1e-12)


def test_cos_average_and_empty_results():
    acc = StatsAccumulator(4)
    r = acc.result()
    assert r["tokens"] == 0 and math.isnan(r["kurtosis"]) and r["outlier_neurons"] == []
    acc.add_cos(0.5)
    acc.add_cos(torch.tensor(0.1))
    acc.add_cos(float("nan"))
    assert acc.result()["cos_sim"] == pytest.approx(0.3)
    acc.reset()
    assert math.isnan(acc.result()["cos_sim"])


def test_update_is_float64_exact_for_half_inputs():
    x = planted().to(torch.bfloat16)
    res = StatsAccumulator(48).update(x).result()
    s2 = (x.double().numpy() ** 2).mean(0)
    assert res["kurtosis"] == pytest.approx((s2**2).mean() / s2.mean() ** 2, rel=1e-12)


def test_width_mismatch_rejected():
    with pytest.raises(ValueError, match="width"):
        StatsAccumulator(4).update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="merge"):
        StatsAccumulator(4).merge(StatsAccumulator(5))
    assert np.isfinite(StatsAccumulator(4).update(torch.ones(2, 4)).result()["kurtosis"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_fast_cosine_matches_numpy_with_zero_rows_index_and_chunks(dtype, monkeypatch):
    g = np.random.default_rng(1)
    x = g.standard_normal((300, 24)) + 0.5
    x[[3, 100, 250]] = 0.0  # zero rows count as cosine 0 with every other row
    t = torch.tensor(x).to(dtype)
    ref = t.double().numpy()

    def np_cos(r):  # as the module's reference, with cos(0, ·) = 0
        norm = np.linalg.norm(r, axis=1, keepdims=True)
        u = np.divide(r, norm, out=np.zeros_like(r), where=norm > 0)
        gram = u @ u.T
        return (gram.sum() - np.trace(gram)) / (len(r) * (len(r) - 1))

    tol = dict(rel=1e-5, abs=1e-7)
    assert float(S.offdiag_cosine_fast(t)) == pytest.approx(np_cos(ref), **tol)
    idx = torch.tensor(g.permutation(300)[:120])
    assert float(S.offdiag_cosine_fast(t, idx)) == pytest.approx(
        np_cos(ref[idx.numpy()]), **tol
    )
    monkeypatch.setattr(S, "_CHUNK", 24 * 7)  # 7 rows per chunk: the chunked sums agree
    assert float(S.offdiag_cosine_fast(t)) == pytest.approx(np_cos(ref), **tol)
    assert float(S.offdiag_cosine_fast(t, idx)) == pytest.approx(
        np_cos(ref[idx.numpy()]), **tol
    )


def test_chunked_mmr_sum_equals_one_shot(monkeypatch):
    x = planted(n=300)
    idx = torch.randperm(300, generator=torch.Generator().manual_seed(2))[:120]
    ref, ref_idx = M.token_mmr(x).sum(), M.token_mmr(x[idx]).sum()
    monkeypatch.setattr(S, "_CHUNK", 48 * 7)  # 7 rows per chunk
    assert float(S.mmr_sum(x)) == pytest.approx(float(ref), rel=1e-12)
    assert float(S.mmr_sum(x, idx)) == pytest.approx(float(ref_idx), rel=1e-12)


def test_named_sums_are_views_of_one_flat_state():
    acc = StatsAccumulator(4).update(torch.ones(3, 4))
    acc.add_cos(0.5, valid=True)
    acc.all_reduce()  # flushes the host-side counts (no process group: no-op otherwise)
    s = acc.sums
    assert s.tokens.item() == 3 and s.sq.tolist() == [3.0] * 4 and s.cos_count.item() == 1
    assert s.col_sum.data_ptr() == acc.state.data_ptr()  # col_sum, cross, sq, then scalars
    assert s.sq.data_ptr() == acc.state.data_ptr() + 2 * 4 * acc.state.element_size()
    assert acc.state.numel() == 3 * 4 + 7  # three (d,) sums, seven scalars


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("centred", [False, True])
def test_float32_chunk_sums_stay_within_their_documented_error(dtype, centred):
    """CPU float32/bf16 batches are summed in float32 chunks (stats docstring): over several
    chunks of hard data (a 300× neuron, a per-token offset, massive tokens) each per-neuron sum
    stays within F32_SUM_RTOL of float64 sums of the same values, and a float64 batch is
    summed in float64 (to rounding order)."""
    g = torch.Generator().manual_seed(7)
    n, d = 3 * S._F32_ROWS + 17, 96  # three full float32 chunks and a part
    x = torch.randn(n, d, generator=g) + 2.0 * torch.randn(n, 1, generator=g)
    x[:, 5] *= 300
    x[::97] *= 50
    x = x.to(dtype)
    acc = StatsAccumulator(d, extras=False, authors=centred)
    acc.update(x)
    x64 = x.double()
    mu = x64.mean(1, keepdim=True)
    want = {"sq": (x64 ** 2).sum(0)}
    if centred:
        want |= {"col_sum": x64.sum(0), "cross": (x64 * mu).sum(0)}
    terms = {"sq": x64**2, "col_sum": x64.abs(), "cross": (x64 * mu).abs()}
    for name, ref in want.items():  # error relative to the sum of the terms' magnitudes
        err = (getattr(acc.sums, name) - ref).abs() / terms[name].sum(0)
        assert err.max().item() <= S.F32_SUM_RTOL, name
    acc64 = StatsAccumulator(d, extras=False, authors=centred).update(x64)
    assert torch.allclose(acc64.sums.sq, want["sq"], rtol=1e-13)
    assert acc.result()["kurtosis"] == pytest.approx(M.kurtosis(x64), rel=S.F32_SUM_RTOL)
