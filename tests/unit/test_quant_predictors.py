"""Spearman's ρ (ties by average rank) against hand computations, and the predictor table's
wiring of a sensitivity result and a profile into per-block values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from outlierlab.experiments.significance import rankdata
from outlierlab.quant.predictors import PREDICTORS, predictor_table, spearman


def test_ranks_average_ties():
    assert rankdata([10.0, 30.0, 20.0, 20.0, 5.0]).tolist() == [2.0, 5.0, 3.5, 3.5, 1.0]
    assert rankdata([1.0, 1.0, 1.0]).tolist() == [2.0, 2.0, 2.0]
    assert rankdata([]).tolist() == []


def test_spearman_by_hand():
    # no ties: ρ = 1 − 6 Σd² / (n(n²−1)); ranks a = 1 2 3 4 5, b = 2 1 4 3 5 → Σd² = 4, ρ = 0.8
    assert spearman([1, 2, 3, 4, 5], [20, 10, 40, 30, 50]) == pytest.approx(0.8, abs=1e-12)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # ties: Pearson of average ranks, float64 numpy reference
    a, b = [1.0, 2.0, 2.0, 3.0, 7.0, 7.0], [5.0, 1.0, 1.0, 4.0, 8.0, 9.0]
    ra, rb = np.array([1, 2.5, 2.5, 4, 5.5, 5.5]), np.array([4, 1.5, 1.5, 3, 5, 6])
    want = float(np.corrcoef(ra, rb)[0, 1])
    assert spearman(a, b) == pytest.approx(want, abs=1e-12)
    # by hand: centred ranks −2.5 −1 −1 .5 2 2 and .5 −2 −2 −.5 1.5 2.5: Σ 10.5, 16.5, 17
    assert spearman(a, b) == pytest.approx(10.5 / math.sqrt(16.5 * 17), abs=1e-12)
    # non-finite and None pairs are dropped; too few pairs or a constant side: None
    assert spearman([1, 2, None, 3, math.inf], [1, 2, 5, 3, 0]) == pytest.approx(1.0)
    assert spearman([1, 2], [2, 1]) is None
    assert spearman([1, 1, 1], [1, 2, 3]) is None
    with pytest.raises(ValueError, match="equal lengths"):
        spearman([1, 2, 3], [1, 2])


def test_predictor_table_from_sensitivity_and_profile():
    kl = [0.01, 0.5, 0.02, 0.001]  # block 1 does the damage
    sens = {
        "blocks": [{"name": f"blocks.{i}", "alone_kl": k, "without_kl": k / 2,
                    "output_error": 10 * k} for i, k in enumerate(kl)]
        + [{"name": "other", "alone_kl": 0.0, "without_kl": 0.0, "output_error": 0.0}],
        "groups": {f"blocks.{i}": [f"l{i}.a", f"l{i}.b"] for i in range(4)},
        "layer_stats": [{"name": f"l{i}.{s}", "act_sqnr_db": 30 - 40 * k + (s == "b"),
                         "weight_sqnr_db": 40.0} for i, k in enumerate(kl) for s in "ab"],
    }  # fmt: skip
    prof = [(5, 10), (9, 300), (6, 20), (7, 15)]  # (Kurt, max/median) per block
    profile = {"points": [{"name": f"blocks.{i}.resid_post", "kurtosis": kurt,
                           "kurtosis_no_first": 3.0, "max_median_ratio": mmr,
                           "token_excess_kurtosis": float("nan")}
                          for i, (kurt, mmr) in enumerate(prof)]}  # fmt: skip
    res = predictor_table(sens, profile)
    assert [b["block"] for b in res["blocks"]] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert res["blocks"][1]["act_sqnr_db"] == pytest.approx(10.0)  # the worst of l1.a / l1.b
    rho = {r["key"]: r for r in res["rows"]}
    assert [r["key"] for r in res["rows"]] == [k for _, k, _ in PREDICTORS]
    # by hand: damage ranks 2 4 3 1; Kurt ranks 1 4 2 3 → Σd² = 1+0+1+4 = 6, ρ = 1 − 36/60
    assert rho["kurtosis"]["rho_alone"] == pytest.approx(0.4)
    assert rho["max_median_ratio"]["rho_alone"] == pytest.approx(0.8)  # 1 4 3 2: Σd² = 2
    assert rho["output_error"]["rho_alone"] == pytest.approx(1.0)
    assert rho["output_error"]["rho_without"] == pytest.approx(1.0)
    assert rho["act_sqnr_db"]["rho_alone"] == pytest.approx(-1.0)  # lower SQNR, more damage
    assert rho["weight_sqnr_db"]["rho_alone"] is None  # constant
    assert rho["kurtosis_no_first"]["rho_alone"] is None
    osp = rho["token_excess_kurtosis"]
    assert osp["n"] == 0 and osp["rho_alone"] is None


def test_measure_predictors_on_a_gpt_matches_its_own_blocks():
    """On a 4-block GPT: one row per block with its damage alone, every ρ the float64 Spearman
    of the table's own columns, and a verified recommendation."""
    import torch

    from outlierlab.model import GPT, GPTConfig
    from outlierlab.quant import scheme
    from outlierlab.quant.predictors import measure_predictors

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, n_layer=4, d_model=32, n_head=2, seq_len=16))
    with torch.no_grad():  # a planted outlier neuron in block 2's MLP input (via its LN gain)
        model.blocks[2].mlp_norm.weight[5] = 40.0
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 64, (4, 16), generator=g)
    y = torch.roll(x, -1, 1)
    calib = [torch.randint(0, 64, (4, 16), generator=g) for _ in range(2)]
    res = measure_predictors(model, scheme("w8a8-tensor"), calib, x, y, batch_size=2)
    assert res["scheme"] == "w8a8-tensor" and res["windows"] == 2 and res["linears"] == 16
    assert [b["block"] for b in res["blocks"]] == [f"blocks.{i}" for i in range(4)]
    assert all(b["alone_kl"] >= 0 for b in res["blocks"])
    alone = np.array([b["alone_kl"] for b in res["blocks"]], dtype=np.float64)
    for row in res["rows"]:
        vals = [b[row["key"]] for b in res["blocks"]]
        if row["rho_alone"] is None:
            continue
        ra = rankdata(np.array(vals, dtype=np.float64))
        want = float(np.corrcoef(ra, rankdata(alone))[0, 1])
        assert row["rho_alone"] == pytest.approx(want, abs=1e-12), row["key"]
    assert sum(r["rho_alone"] is not None for r in res["rows"]) >= 5
    assert 0 < len(res["keep_16bit"]) <= 16 and res["verified_recovery"] >= 0.9
