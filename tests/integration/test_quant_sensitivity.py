"""Layer sensitivity and the mixed-precision recommendation on a tiny Llama whose damage sits in
a known layer: a Sun et al.-style massive activation planted on token 0 in block 1's MLP, which a
static per-tensor activation range (w8a8-tensor) pays for at that block's down projection."""

from __future__ import annotations

import pytest
import torch

from outlierlab.quant import scheme
from outlierlab.quant.calibrate import calibrate
from outlierlab.quant.evaluate import logits_of
from outlierlab.quant.sensitivity import _Damage, layer_sensitivity
from outlierlab.quant.wrap import wrap

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from tiny_llama import EOS, PLANT_LAYER, plant_massive, tiny_llama  # noqa: E402


def windows(n: int, t: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (n, t + 1), generator=g)
    ids[:, 0] = EOS  # the planted token starts every window
    return ids[:, :-1], ids[:, 1:]


@pytest.fixture(scope="module")
def planted():
    return plant_massive(tiny_llama(), gain=6.0)


def test_damage_of_no_layer_is_zero_and_of_all_is_the_quantised_model(planted):
    cfg = scheme("w8a8-tensor")
    x, y = windows(4)
    calib = [windows(4, seed=s)[0] for s in (1, 2)]
    q = wrap(planted, cfg)
    calibrate(q, cfg, calib, logits_of)
    d = _Damage(planted, q, x, y, 2)
    assert d(set()) == {"kl": pytest.approx(0.0, abs=1e-9), "ppl": pytest.approx(
        torch.nn.functional.cross_entropy(logits_of(planted, x).reshape(-1, 258), y.reshape(-1))
        .exp().item(), rel=1e-5), "output_error": pytest.approx(0.0, abs=1e-6)}  # fmt: skip
    full = d(set(d.layers))
    zp, zq = logits_of(planted, x).double(), logits_of(q, x).double()
    lp, lq = torch.log_softmax(zp, -1), torch.log_softmax(zq, -1)
    want = float((lp.exp() * (lp - lq)).sum(-1).mean())  # KL(p ‖ q) per token, float64
    assert full["kl"] == pytest.approx(want, rel=1e-3) and full["kl"] > 0
    rel = float((zq - zp).norm() / zp.norm())  # relative error at the output, float64
    assert full["output_error"] == pytest.approx(rel, rel=1e-3) and rel > 0
    # a later evaluation that starts from the kept block outputs equals a full forward
    one = f"model.layers.{PLANT_LAYER}.mlp.down_proj"
    skipped = d({one})
    assert d.block_passes < 3  # the none reference, the full pass, then blocks 1.. of 3
    fresh = _Damage(planted, q, x, y, 2)({one})
    assert skipped == pytest.approx(fresh, rel=1e-5, abs=1e-7)


def test_recommendation_finds_the_planted_layer_and_is_verified(planted):
    x, y = windows(4)
    calib = [windows(4, seed=s)[0] for s in (1, 2)]
    res = layer_sensitivity(planted, scheme("w8a8-tensor"), calib, x, y, batch_size=2)
    top_block = max(res["blocks"], key=lambda r: r["alone_kl"])
    assert top_block["name"] == f"blocks.{PLANT_LAYER}"
    assert res["searched_blocks"][0] == f"blocks.{PLANT_LAYER}"
    searched = [r for r in res["blocks"] if r["name"] in res["searched_blocks"]]
    assert all(r["without_kl"] is not None for r in searched)  # all-but for those blocks only
    assert all(r["without_kl"] is None for r in res["blocks"] if r not in searched)
    assert top_block["without_kl"] > 0.5 * res["full"]["kl"]
    worst = res["layers"][0]
    assert worst["name"] == f"model.layers.{PLANT_LAYER}.mlp.down_proj"
    assert worst["alone_kl"] > 0.5 * res["full"]["kl"]  # it does most of the damage alone
    ranking = [r["name"] for r in res["ranking"]]
    assert sorted(ranking) == sorted(res["layer_stats"][i]["name"] for i in range(21))  # all
    rec = res["recommendation"]
    assert rec["keep_16bit"] == ranking[: len(rec["keep_16bit"])]  # a prefix of the ranking
    assert rec["keep_16bit"][0] == worst["name"]
    assert rec["reached"] and rec["verified_recovery"] >= res["share"]  # a real evaluation
    assert rec["history"][0]["keep"] == 1  # doubling starts from the top linear
    if len(rec["keep_16bit"]) > 1:  # the shortest: one linear fewer fell short
        shorter = [h for h in rec["history"] if h["keep"] == len(rec["keep_16bit"]) - 1]
        assert shorter and res["full"]["kl"] - shorter[0]["kl"] < res["share"] * res["full"]["kl"]
    # the search costs: none + full + 1 per block + 1 per searched block (all-but) + 1 per
    # searched linear + the verifications
    n_lin = sum(b["linears"] for b in searched)
    assert res["evaluations"] == (2 + len(res["blocks"]) + len(searched) + n_lin
                                  + rec["verifications"])  # fmt: skip
    with pytest.raises(ValueError, match="share"):
        layer_sensitivity(planted, scheme("w8a8-tensor"), calib, x, y, share=1.5)


def test_damage_in_two_known_blocks_is_found(planted):
    """A second massive activation planted in block 2: its MLP unit 1 reads the direction block
    1 writes into token 0's residual stream, so block 2's down projection gets a massive input on
    token 0 too. The two planted blocks lead the blocks, their down projections the ranking, and
    the verified set reaches the target."""
    import copy

    two = copy.deepcopy(planted)
    with torch.no_grad():
        v = two.model.layers[PLANT_LAYER].mlp.down_proj.weight[:, 0]  # the planted unit's write
        mlp = two.model.layers[PLANT_LAYER + 1].mlp
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[1] = 6.0 * v / v.norm()
    x, y = windows(4)
    calib = [windows(4, seed=s)[0] for s in (1, 2)]
    # share 0.99: block 1 alone holds 92 % of the blocks' damage, so 90 % would search only it
    res = layer_sensitivity(two, scheme("w8a8-tensor"), calib, x, y, batch_size=2, share=0.99)
    assert res["searched_blocks"][:2] == [f"blocks.{PLANT_LAYER}", f"blocks.{PLANT_LAYER + 1}"]
    blocks = sorted(res["blocks"], key=lambda r: -r["alone_kl"])
    both = {f"blocks.{i}" for i in (PLANT_LAYER, PLANT_LAYER + 1)}
    assert {r["name"] for r in blocks[:2]} == both
    planted_downs = {f"model.layers.{i}.mlp.down_proj" for i in (PLANT_LAYER, PLANT_LAYER + 1)}
    assert {r["name"] for r in res["ranking"][:2]} == planted_downs
    rec = res["recommendation"]
    assert rec["reached"] and rec["verified_recovery"] >= 0.99
    assert set(rec["keep_16bit"][:2]) == planted_downs
