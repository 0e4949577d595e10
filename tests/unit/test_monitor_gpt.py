"""OutlierMonitor on outlierlab's own GPT (the residual_points() protocol)."""

from __future__ import annotations

import pytest
import torch

from outlierlab import OutlierMonitor
from outlierlab import metrics as M
from outlierlab.model import GPT, GPTConfig
from tolerances import F32_SUMS


@pytest.mark.parametrize("preset", ["pre-ln", "op"])
def test_gpt_points_equal_direct_metrics(preset):
    torch.manual_seed(0)
    cfg = GPTConfig.preset(
        preset, vocab_size=64, n_layer=3, d_model=32, n_head=2, d_mlp=64, seq_len=16
    )
    model = GPT(cfg).eval()
    seen = {}
    hooks = [
        m.register_forward_hook(lambda mod, a, o, n=n: seen.__setitem__(n, o.detach()))
        for n, m in model.residual_points().items()
    ]
    idx = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))
    with OutlierMonitor(model, mmr_max_tokens=None, cos_max_tokens=None) as mon:
        model(idx)
    for h in hooks:
        h.remove()
    res = mon.results()
    assert list(res) == ["embed.resid_post"] + [f"blocks.{i}.resid_post" for i in range(3)]
    for name, r in res.items():
        x = seen[name]
        assert x.shape == (3, 16, 32)
        assert r["tokens"] == 48
        assert r["kurtosis"] == pytest.approx(M.kurtosis(x), rel=F32_SUMS)
        assert r["mmr"] == pytest.approx(M.max_median_ratio(x), rel=1e-10)
        assert r["cos_sim"] == pytest.approx(M.token_cosine_similarity(x, None), rel=1e-5, abs=1e-7)
    assert 1 <= mon.summary()["kurtosis_max"] < 3  # random init: no outlier features


def test_gpt_planted_outlier_every_2_with_backward():
    torch.manual_seed(0)
    cfg = GPTConfig.preset(
        "pre-ln", vocab_size=64, n_layer=2, d_model=32, n_head=2, d_mlp=64, seq_len=16
    )
    model = GPT(cfg)
    with torch.no_grad():
        model.tok_emb.weight[:, 11] *= 100
    idx = torch.randint(0, 64, (2, 16))
    with OutlierMonitor(model, every=2) as mon:
        for _ in range(3):  # forwards 0 and 2 measured, with backward passes in between
            _, loss = model(idx, idx)
            loss.backward()
    res = mon.results()
    assert res["embed.resid_post"]["tokens"] == 2 * 32
    assert res["embed.resid_post"]["outlier_neurons"][0] == 11
    assert res["blocks.1.resid_post"]["outlier_neurons"][0] == 11
