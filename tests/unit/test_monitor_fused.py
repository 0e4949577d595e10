"""The monitor's fast hook paths (raw sums centred when read, one gather for both subsamples,
Eq. 2 in numpy, reused buffers; with numba the one-pass kernels of :mod:`outlierlab.fused`;
issue 24 item 4) equal the unfused float64 formulas of :mod:`outlierlab.metrics` on the same
tokens and the same seeded subsamples."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from outlierlab import OutlierMonitor, fused
from outlierlab import metrics as M
from outlierlab import stats as S
from tolerances import F32_SUMS, F32_SUMS_ABS

D = 40


class Feed(nn.Module):
    """Two hooked points that output the activations handed to ``forward``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Identity(), nn.Identity()

    def residual_points(self):
        return {"p.a": self.a, "p.b": self.b}

    def forward(self, xa, xb):
        return self.a(xa), self.b(xb)


def activations(forwards: int, n: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(forwards):
        xa = torch.randn(n // 16, 16, D, generator=g) + 0.3  # a common offset: centring matters
        xa[..., 7] *= 30  # a planted outlier neuron
        xb = torch.randn(n // 16, 16, D, generator=g, dtype=torch.float64) * 2.0
        xb[..., 0, :] *= 40  # massive first-token activations
        out.append((xa, xb))
    return out


def reference(xs: list[torch.Tensor], seed: int, mmr_n: int | None, cos_n: int | None) -> dict:
    """Unfused float64: metrics.py's one-shot formulas over all tokens (Eq. 1, the authors'),
    Eq. 2 and cos-sim on forward m's subsample ``randperm(n, seed + m)`` as the monitor
    draws it (Eq. 2 pooled over tokens, cos-sim averaged over forwards)."""
    rows = [x.reshape(-1, D).double() for x in xs]
    mmr_terms, cos = [], []
    for m, r in enumerate(rows):
        perm = torch.randperm(r.shape[0], generator=torch.Generator().manual_seed(seed + m))
        pick = r if mmr_n is None or r.shape[0] <= mmr_n else r[perm[:mmr_n]]
        mmr_terms.append(M.token_mmr(pick))
        pick = r if cos_n is None or r.shape[0] <= cos_n else r[perm[:cos_n]]
        cos.append(float(M.offdiag_cosine(pick)))
    allr = torch.cat(rows)
    return {"kurtosis": M.kurtosis(allr), "mmr": float(torch.cat(mmr_terms).mean()),
            "cos_sim": float(np.mean(cos)), "kurtosis_authors": M.kurtosis_authors(allr),
            "corr_authors": M.corr_authors(allr), "outlier_neurons": M.outlier_neurons(allr),
            "tokens": allr.shape[0]}  # fmt: skip


def assert_matches(res: dict, ref: dict, f32: bool) -> None:
    """``f32``: float32 activations, whose per-neuron sums are taken in float32 chunks."""
    assert res["mmr"] == pytest.approx(ref["mmr"], rel=1e-10, abs=1e-13)
    for k in ("kurtosis", "kurtosis_authors", "corr_authors"):
        tol = {"rel": F32_SUMS, "abs": F32_SUMS_ABS} if f32 else {"rel": 1e-10, "abs": 1e-13}
        assert res[k] == pytest.approx(ref[k], **tol), k
    assert res["cos_sim"] == pytest.approx(ref["cos_sim"], rel=1e-5, abs=1e-7)  # float32 path
    assert res["outlier_neurons"] == ref["outlier_neurons"]
    assert res["tokens"] == ref["tokens"]


@pytest.mark.parametrize("limits", [(100, 300), (300, 100), (None, None), (100, None)])
@pytest.mark.parametrize("chunked", [False, True])
def test_fused_hook_equals_unfused_float64_reference(limits, chunked, hook_path, monkeypatch):
    mmr_n, cos_n = limits
    if chunked:  # several scratch chunks per forward, and no pre-gathered subsample (the
        monkeypatch.setattr(S, "_SCRATCH", D * 37)  # fused path declines batches this large)
        monkeypatch.setattr(S, "_F32_ROWS", 37)
        monkeypatch.setattr(S, "_CHUNK", D * 50)
    calls = []
    if hook_path == "fused":
        kernel = fused.point_sums
        monkeypatch.setattr(fused, "point_sums", lambda *a: calls.append(1) or kernel(*a))
    model, seed = Feed(), 5
    data = activations(3, 640)
    with OutlierMonitor(model, mmr_max_tokens=mmr_n, cos_max_tokens=cos_n, seed=seed) as mon:
        for xa, xb in data:
            model(xa, xb)
    assert len(calls) == (6 if hook_path == "fused" and not chunked else 0)
    res = mon.results()
    assert_matches(res["p.a"], reference([a for a, _ in data], seed, mmr_n, cos_n), f32=True)
    assert_matches(res["p.b"], reference([b for _, b in data], seed, mmr_n, cos_n), f32=False)


def test_reset_reuses_buffers_without_stale_sums(hook_path):
    """After reset the reused accumulators start from zero: equal to a fresh monitor's."""
    model, data = Feed(), activations(4, 320, seed=1)
    with OutlierMonitor(model, seed=2) as mon:
        for xa, xb in data[:2]:
            model(xa, xb)
        first = mon._acc["p.a"]
        mon.reset()
        mon.number_forwards(2)
        for xa, xb in data[2:]:
            model(xa, xb)
        assert mon._acc["p.a"] is first  # the same object (warm buffers), zeroed
        again = mon.results()
    with OutlierMonitor(model, seed=2) as fresh:
        fresh.number_forwards(2)
        for xa, xb in data[2:]:
            model(xa, xb)
    assert again == fresh.results()
    assert_matches(again["p.a"], reference([a for a, _ in data[2:]], 2 + 2, 256, 1024), True)


def test_numpy_mmr_equals_torch_formula_with_zero_medians():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 9, generator=g)
    x[4] = 0.0  # median 0 and max 0: NaN, as token_mmr
    x[7, :6] = 0.0  # median 0, max > 0: inf
    ref = M.token_mmr(x).sum()
    got = S.mmr_sum_host(x)
    assert np.isnan(got) and torch.isnan(ref)
    keep = torch.tensor([i for i in range(50) if i not in (4, 7)])
    assert S.mmr_sum_host(x[keep]) == pytest.approx(float(M.token_mmr(x[keep]).sum()), rel=1e-13)
    assert S.mmr_sum_host(x[[7]]) == float("inf")
