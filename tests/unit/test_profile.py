"""Massive-activation profile (outlierlab.profile) against float64 numpy hand computations on
a model whose measured point is a fixed tensor with a planted massive activation on token 0."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from outlierlab.profile import SINK_THRESHOLD, profile

N, T, D = 5, 7, 16
WIN, CH, BIG = 2, 3, 900.0


def planted() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(N, T, D, generator=g)
    acts[:, 0, CH] = 60.0  # first-token sink channel on every window
    acts[WIN, 0, CH] = BIG  # the one massive activation
    return acts


class Fixed(nn.Module):
    """Returns the planted activations of the windows it is given (ids are window indices)."""

    def __init__(self) -> None:
        super().__init__()
        self.acts = planted()
        self.block = nn.Identity()
        self.w = nn.Parameter(torch.zeros(1))

    def residual_points(self) -> dict[str, nn.Module]:
        return {"blocks.0.resid_post": self.block}

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.block(self.acts[idx[:, 0]])


def _kurt(a: np.ndarray) -> float:
    ms = (a.reshape(-1, a.shape[-1]) ** 2).mean(0)
    return float((ms**2).mean() / ms.mean() ** 2)


def test_profile_matches_numpy_float64():
    x = torch.arange(N).unsqueeze(1).repeat(1, T)  # window i → planted window i
    res = profile(Fixed(), x, batch_size=2, top_k=3, attention=False)
    assert res["attention"] is None
    (p,) = res["points"]
    a = planted().double().numpy()
    assert p["tokens"] == N * T
    assert p["top"][0] == {"value": BIG, "window": WIN, "token": 0, "channel": CH}
    assert [t["token"] for t in p["top"]] == [0, 0, 0]  # then the 60s on other windows
    absa = np.abs(a)
    assert p["max_abs"] == BIG
    assert p["median_abs"] == pytest.approx(float(np.median(absa)), rel=1e-6)
    assert p["max_median_ratio"] == pytest.approx(BIG / float(np.median(absa)), rel=1e-6)
    assert p["kurtosis"] == pytest.approx(_kurt(a), rel=1e-9)
    assert p["kurtosis_no_first"] == pytest.approx(_kurt(a[:, 1:]), rel=1e-9)
    assert p["kurtosis"] > 10 * p["kurtosis_no_first"]  # the first-token effect
    c = a.reshape(-1, D) - a.reshape(-1, D).mean(1, keepdims=True)
    ex = (c**4).mean(1) / (c**2).mean(1) ** 2 - 3
    assert p["token_excess_kurtosis"] == pytest.approx(float(np.maximum(ex, 0).mean()), rel=1e-9)


def test_gpt_attention_sink_matches_softmax_by_hand():
    from outlierlab.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig.preset("pre-ln", vocab_size=50, n_layer=2, d_model=32, n_head=2, d_mlp=64,
                           seq_len=16)  # fmt: skip
    model = GPT(cfg).eval()
    x = torch.randint(0, 50, (3, 16))
    captured = {}
    attn = model.blocks[1].attn
    h = attn.register_forward_pre_hook(lambda m, a: captured.setdefault("x", a[0].clone()))
    res = profile(model, x, batch_size=3)
    h.remove()
    rows = {r["layer"]: r for r in res["attention"]}
    assert set(rows) == {"blocks.0.attn", "blocks.1.attn"}
    with torch.no_grad():
        logits = attn.attention_logits(captured["x"]).double().numpy()  # (B, H, T, T)
    mask = np.tril(np.ones((16, 16), bool))
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    m = probs[:, :, 1:, 0].mean((0, 2))  # per head, queries ≥ 1
    got = rows["blocks.1.attn"]
    assert got["heads"] == 2
    np.testing.assert_allclose(got["mass_token0_per_head"], m, rtol=1e-6)  # float32 probs
    assert got["mass_token0"] == pytest.approx(float(m.mean()), rel=1e-6)
    assert got["sink_share"] == float((m > SINK_THRESHOLD).mean())
    assert all(math.isfinite(p["kurtosis"]) for p in res["points"])
