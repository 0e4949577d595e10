"""`w8a8-outputs`, the rotation baseline and `outlierlab price` on a tiny HF Llama with a planted
Sun et al.-style massive activation on the first token (nothing downloaded)."""

from __future__ import annotations

import json

import pytest
import torch

from outlierlab.cli import main
from outlierlab.errors import ConfigError
from outlierlab.quant import calibrate, logits_of, quant_linears, scheme, wrap
from outlierlab.quant.rotate import rotate, rotation_matrix
from outlierlab.quant.wrap import residual_quantizers

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from tiny_llama import EOS, LAYERS, PLANT_LAYER, plant_massive, tiny_llama, write_gguf  # noqa: E402


def _windows(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 32), generator=g)
    x[:, 0] = EOS  # the massive activation sits on this first token
    return x


def _kl(model, cfg, calib, x) -> float:
    """Mean KL(FP ‖ quantised) of the next-token distributions over tokens 1.. (nats)."""
    q = wrap(model, cfg)
    calibrate(q, cfg, calib, logits_of)
    with torch.no_grad():
        a, b = logits_of(model, x).log_softmax(-1), logits_of(q, x).log_softmax(-1)
    return float((a.exp() * (a - b)).sum(-1)[:, 1:].mean())


def test_planted_massive_activation_damage_tensor_far_above_dynamic():
    from outlierlab.profile import profile

    model = plant_massive(tiny_llama())
    calib, x = [_windows(4, s) for s in (1, 2)], _windows(8, 3)
    prof = {p["name"]: p for p in profile(model, x, attention=False)["points"]}
    block = prof[f"blocks.{PLANT_LAYER}.resid_post"]
    assert block["top"][0]["token"] == 0 and block["max_median_ratio"] > 300
    kl = {s: _kl(model, scheme(s), calib, x)
          for s in ("w8a8-tensor", "w8a8-dynamic", "w8a8-outputs")}
    assert kl["w8a8-tensor"] > 100 * kl["w8a8-dynamic"]
    assert kl["w8a8-outputs"] > 3 * kl["w8a8-tensor"]  # the residual stream is quantised too


def test_w8a8_outputs_quantises_outputs_norms_and_residual():
    model = tiny_llama()
    cfg = scheme("w8a8-outputs")
    assert cfg.a_granularity == "tensor" and not cfg.quantize_head
    q = wrap(model, cfg)
    calibrate(q, cfg, [_windows(2, 0)], logits_of)
    assert all(m.out_act is not None and m.out_act._static for m in quant_linears(q).values())
    kinds = {aq.kind for aq in residual_quantizers(q).values()}
    outs = residual_quantizers(q)
    assert kinds == {"residual", "norm"}
    assert sum(aq.kind == "residual" for aq in outs.values()) == LAYERS + 1  # embed + blocks
    assert sum(aq.kind == "norm" for aq in outs.values()) == 2 * LAYERS + 1  # + final norm
    assert type(q.lm_head).__name__ == "Linear"  # the head stays in full precision
    q16 = wrap(model, scheme("w8a8-outputs", w_bits=16, a_bits=16))
    x = _windows(2, 5)  # calibrated on the same windows: no value outside its static range
    calibrate(q16, q16.model.layers[0].self_attn.q_proj.cfg, [x], logits_of)
    torch.testing.assert_close(logits_of(q16, x), logits_of(model, x), atol=2e-3, rtol=0)


def test_rotation_preserves_the_function_and_spreads_the_outlier():
    model = plant_massive(tiny_llama())
    with torch.no_grad():
        for b in model.model.layers:
            b.input_layernorm.weight.uniform_(0.5, 2.0)
            b.post_attention_layernorm.weight.uniform_(0.5, 2.0)
        model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rot = rotate(model)
    x = _windows(3, 7)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(rot, x), logits_of(model, x), atol=1e-4, rtol=0)
        emb = rot.model.embed_tokens.weight
        assert emb[EOS].abs().max() < 0.9  # channel 5's 1.0 spread over all channels
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    for d in (8, 12):
        q = rotation_matrix(d)
        torch.testing.assert_close(q @ q.T, torch.eye(d, dtype=q.dtype))
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ConfigError, match="Llama-family"):
        rotate(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=20)))


def test_price_cli_writes_the_page(tmp_path, capsys):
    g = write_gguf(plant_massive(tiny_llama()), tmp_path / "tiny.gguf")
    out = tmp_path / "page"
    rc = main(["price", str(g), "--out", str(out), "--seq-len", "32", "--eval-windows", "4",
               "--stats-windows", "2", "--quiet", "--schemes", "all"])  # fmt: skip
    assert rc == 0
    for f in ("price.md", "price.html", "price.json", "price_kurt.png", "price_sqnr.png"):
        assert (out / f).stat().st_size > 0
    res = json.loads((out / "price.json").read_text())
    labels = [r["label"] for r in res["schemes"]]
    assert labels == ["w8a8-tensor", "w8a8-dynamic", "w8a8-outputs", "smoothquant α=0.5",
                      "smoothquant α=0.8", "rotation + w8a8-tensor", "fp8-tensor", "fp8-dynamic",
                      "w4a16-rtn", "w4a16-gptq", "w4a4-quarot", "smoothquant-search"]  # fmt: skip
    assert all(r["quant_ppl"] > 1 for r in res["schemes"])
    assert len(res["profile"]["points"]) == LAYERS + 1 and res["profile"]["attention"]
    md = (out / "price.md").read_text()
    search = res["schemes"][-1]
    assert search["smooth_alpha"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    assert "smoothquant-search (α=" in md
    assert "w8a8-outputs" in md and "Attention sinks" in md and "price_kurt.png" in md
    assert "page:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as bad:  # argparse's one-line usage error
        main(["price", str(g), "--eval-windows", "0"])
    assert bad.value.code == 2
    assert "--eval-windows: '0' is not allowed" in capsys.readouterr().err


def test_price_default_rows_and_the_schemes_option(tmp_path, capsys):
    from outlierlab.price import DEFAULT_SCHEMES, row_labels, schemes

    assert row_labels(None) == list(DEFAULT_SCHEMES)
    assert row_labels(["all"]) == [label for label, _ in schemes()]
    assert row_labels(["w4a16-rtn", "w8a8-tensor"]) == ["w8a8-tensor", "w4a16-rtn"]  # page order
    with pytest.raises(ConfigError, match="'w8a8' is not allowed; allowed: all, w8a8-tensor"):
        row_labels(["w8a8"])
    g = write_gguf(plant_massive(tiny_llama()), tmp_path / "tiny.gguf")
    out = tmp_path / "page"
    assert main(["price", str(g), "--out", str(out), "--seq-len", "32", "--eval-windows", "2",
                 "--stats-windows", "1", "--quiet", "--no-figures"]) == 0  # fmt: skip
    res = json.loads((out / "price.json").read_text())
    assert [r["label"] for r in res["schemes"]] == list(DEFAULT_SCHEMES)
    assert set(res["stage_seconds"]) == {"profile", "fp_eval", *DEFAULT_SCHEMES}
    capsys.readouterr()
    assert main(["price", str(g), "--schemes", "w9a9"]) == 2  # refused before loading
    assert "--schemes 'w9a9' is not allowed" in capsys.readouterr().err
