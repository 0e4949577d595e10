"""The serving schemes of issue 22 on a tiny HF Llama: QuaRot's complete rotation (online
Hadamard on down_proj) preserves the function in float64 and lowers W4A4 damage on a planted
outlier channel; FP8, W4A16 RTN / GPTQ and the SmoothQuant α search run end to end; and the
calibration passes each scheme costs on the price page (counted, not timed)."""

from __future__ import annotations

import pytest
import torch

from outlierlab.quant import CalibCache, calibrate, logits_of, quant_linears, scheme, wrap
from outlierlab.quant.config import SMOOTH_GRID
from outlierlab.quant.evaluate import prepared, quantize_and_evaluate
from outlierlab.quant.rotate import OnlineHadamard, rotate

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from tiny_llama import EOS, plant_massive, tiny_llama  # noqa: E402


def _windows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 32), generator=g)
    x[:, 0] = EOS
    return x


def _kl(model, cfg, calib, x, cache=None) -> float:
    """Mean KL(FP ‖ quantised) of the next-token distributions over tokens 1.. (nats)."""
    target, cache = prepared(model, cfg, cache)
    q = wrap(target, cfg)
    calibrate(q, cfg, calib, logits_of, cache)
    with torch.no_grad():
        a, b = logits_of(model, x).log_softmax(-1), logits_of(q, x).log_softmax(-1)
    return float((a.exp() * (a - b)).sum(-1)[:, 1:].mean())


def _odd_llama():
    """Widths with no power-of-two Hadamard: d = 24 = 2·12, d_ff = 48 = 4·12 (Paley H_12)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=258, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("make", [lambda: plant_massive(tiny_llama(planted=True)), _odd_llama])
def test_complete_rotation_preserves_logits_in_float64(make):
    model = make().double()
    with torch.no_grad():
        for b in model.model.layers:
            b.input_layernorm.weight.uniform_(0.5, 2.0)
            b.post_attention_layernorm.weight.uniform_(0.5, 2.0)
    rot = rotate(model, online_hadamard=True)
    downs = [b.mlp.down_proj for b in rot.model.layers]
    assert all(isinstance(d.online_hadamard, OnlineHadamard) for d in downs)
    x = _windows(3, 7)
    with torch.no_grad():
        want = logits_of(model, x)
        torch.testing.assert_close(logits_of(rot, x), want, atol=1e-5, rtol=0)
        q = wrap(rot, scheme("w4a4-quarot"))  # quantisers off: the pre-hook travels with it
        assert all(hasattr(m, "online_hadamard") for n, m in quant_linears(q).items()
                   if n.endswith("down_proj"))  # fmt: skip
        torch.testing.assert_close(logits_of(q, x), want, atol=1e-5, rtol=0)
        seen = []
        h = q.model.layers[0].mlp.down_proj.act.register_forward_pre_hook(
            lambda m, a: seen.append(a[0]))
        logits_of(q, x)
        h.remove()
        plain = []
        h = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
            lambda m, a: plain.append(a[0]))
        logits_of(model, x)
        h.remove()
        assert not torch.allclose(seen[0], plain[0])  # the quantiser sees x·H/√n, not x
        torch.testing.assert_close(seen[0].norm(dim=-1), plain[0].norm(dim=-1))


def test_w4a4_rotation_lowers_damage_on_a_planted_outlier_channel():
    model = tiny_llama(planted=True)  # residual channel 5 × 400 on every token
    calib, x = [_windows(4, s) for s in (1, 2)], _windows(8, 3)
    rotated = _kl(model, scheme("w4a4-quarot"), calib, x)
    plain = _kl(model, scheme("w4a4-quarot", rotation=None), calib, x)
    assert rotated < 0.85 * plain


def test_serving_schemes_end_to_end():
    model = tiny_llama()
    calib, x = [_windows(4, s) for s in (1, 2)], _windows(8, 3)
    kl = {s: _kl(model, scheme(s), calib, x) for s in
          ("w8a8-dynamic", "fp8-tensor", "fp8-dynamic", "w4a16-rtn", "w4a16-gptq")}  # fmt: skip
    assert kl["w4a16-gptq"] < kl["w4a16-rtn"]  # GPTQ's error feedback pays at 4 bits
    assert max(kl["fp8-tensor"], kl["fp8-dynamic"]) < kl["w4a16-rtn"]
    cfg = scheme("w4a16-gptq")
    q = wrap(model, cfg)
    calibrate(q, cfg, calib, logits_of)
    assert all(m.act.mode == "off" for m in quant_linears(q).values())  # A16: inputs untouched
    res = quantize_and_evaluate(model, cfg, calib, x[:, :-1], x[:, 1:], 4, 2)
    assert all(r["act_sqnr_db"] is None and r["weight_sqnr_db"] > 10 for r in res["layers"])


def test_smoothquant_search_picks_alpha_on_calibration_only():
    model = plant_massive(tiny_llama())
    calib = [_windows(4, s) for s in (1, 2)]
    cfg = scheme("smoothquant-search")
    res = [quantize_and_evaluate(model, cfg, calib, v[:, :-1], v[:, 1:], 4, 2)
           for v in (_windows(4, 3), _windows(4, 9))]  # fmt: skip
    ce = res[0]["smooth_search_ce"]
    assert list(ce) == [str(a) for a in SMOOTH_GRID]
    assert res[0]["smooth_alpha"] == float(min(ce, key=ce.get))
    assert res[0]["smooth_alpha"] == res[1]["smooth_alpha"] and res[0]["smooth_search_ce"] == ce
    assert res[0]["config"]["smooth_search"] and res[0]["config"]["smooth_alpha"] is None


def test_calibration_passes_per_price_scheme():
    """What each price row costs in calibration passes with the page's shared caches (the
    figures in outlierlab.price's docstring and docs/quant.md), counted on a tiny Llama."""
    from outlierlab.price import ROTATION, _compute_order, schemes

    model = tiny_llama()
    calib = [_windows(2, s) for s in (1, 2)]
    calls = 0

    def counting(m, x):
        nonlocal calls
        calls += 1
        return logits_of(m, x)

    caches = {"model": CalibCache(), "rotated": CalibCache()}
    passes, chosen = {}, None
    for label, cfg in sorted(schemes(), key=lambda s: _compute_order(s[0])):
        target, cache = prepared(model, cfg, caches["model"])
        if label == ROTATION:
            target, cache = rotate(model), caches["rotated"]
        calls = 0
        info = calibrate(wrap(target, cfg), cfg, calib, counting, cache)
        passes[label] = calls / len(calib)
        chosen = info["smooth_alpha"] if cfg.smooth_search else chosen
    assert passes == {
        "w8a8-outputs": 1, "w8a8-tensor": 0, "w8a8-dynamic": 0, "smoothquant α=0.5": 2,
        "smoothquant α=0.8": 1, ROTATION: 1, "fp8-tensor": 1, "fp8-dynamic": 0, "w4a16-rtn": 0,
        "w4a16-gptq": 1, "w4a4-quarot": 1,
        "smoothquant-search": 6 + (chosen not in (0.5, 0.8)),  # one CE pass per α, then ranges
    }  # fmt: skip


def test_gptq_of_linears_sharing_an_input_equals_gptq_of_each():
    """q/k/v (and gate/up) read the same input: one GPTQ over their stacked rows gives each
    layer what its own GPTQ would (rows are independent given H)."""
    from outlierlab.quant.calibrate import _fp_stats, _gptq_shared_inputs
    from outlierlab.quant.gptq import gptq_quantize

    model = tiny_llama(planted=True)
    cfg = scheme("w4a16-gptq", w_group_size=8)
    q = wrap(model, cfg)
    layers = quant_linears(q)
    xtx = _fp_stats(layers, q, [_windows(4, 1)], logits_of, None, "xtx")
    done = _gptq_shared_inputs(layers, cfg, xtx)
    attn, mlp = "model.layers.0.self_attn.", "model.layers.0.mlp."
    assert {attn + p for p in ("q_proj", "k_proj", "v_proj")} | {mlp + "gate_proj"} <= done
    assert attn + "o_proj" not in done and mlp + "down_proj" not in done
    for name in (attn + "k_proj", mlp + "up_proj"):
        own = gptq_quantize(layers[name].weight.float(), xtx[name], 4, False, 8)
        torch.testing.assert_close(layers[name].weight_q, own, rtol=0, atol=1e-5)
