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

KEYS = ("kurtosis", "kurtosis_centred", "mmr", "token_excess_kurtosis", "share_above_6")


def one_shot(x):
    return {
        "kurtosis": M.kurtosis(x),
        "kurtosis_centred": M.kurtosis_centred(x),
        "mmr": M.max_median_ratio(x),
        "token_excess_kurtosis": M.token_excess_kurtosis(x),
        "share_above_6": M.share_above(x, 6.0),
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
    acc = M.StatsAccumulator(48)
    bounds = [0, *sorted(cuts), 200]
    for a, b in itertools.pairwise(bounds):
        acc.update(x[a:b])
    assert_same(acc.result(), one_shot(x))


def test_merge_equals_one_shot_and_shapes_are_free():
    x = planted().reshape(4, 50, 48)  # (..., d) input
    a = M.StatsAccumulator(48).update(x[:1])
    b = M.StatsAccumulator(48).update(x[1:])
    assert_same(a.merge(b).result(), one_shot(x))
    assert a.result()["outlier_neurons"] == [3, 30]


def test_mask_drops_padding():
    x = planted().reshape(10, 20, 48)
    mask = torch.ones(10, 20, dtype=torch.long)
    mask[:, 15:] = 0
    x[:, 15:] = 1e4  # garbage in padded positions must not count
    res = M.StatsAccumulator(48).update(x, mask).result()
    assert_same(res, one_shot(x[:, :15]))


def test_mmr_subsample_is_a_subset_estimate():
    x = planted(n=2000)
    res = M.StatsAccumulator(48).update(x, mmr_max_tokens=300, seed=1).result()
    assert res["tokens"] == 2000
    assert res["kurtosis"] == pytest.approx(M.kurtosis(x), rel=1e-10)
    assert res["mmr"] == pytest.approx(M.max_median_ratio(x), rel=0.1)
    assert res["mmr"] != pytest.approx(M.max_median_ratio(x), rel=1e-12)


def test_cos_average_and_empty_results():
    acc = M.StatsAccumulator(4)
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
    res = M.StatsAccumulator(48).update(x).result()
    s2 = (x.double().numpy() ** 2).mean(0)
    assert res["kurtosis"] == pytest.approx((s2**2).mean() / s2.mean() ** 2, rel=1e-12)


def test_width_mismatch_rejected():
    with pytest.raises(ValueError, match="width"):
        M.StatsAccumulator(4).update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="merge"):
        M.StatsAccumulator(4).merge(M.StatsAccumulator(5))
    assert np.isfinite(M.StatsAccumulator(4).update(torch.ones(2, 4)).result()["kurtosis"])
