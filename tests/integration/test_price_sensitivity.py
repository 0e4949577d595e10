"""``outlierlab price --sensitivity / --crosscheck / --full`` and ``price A B`` on tiny HF Llamas
written as GGUF files (one with a planted Sun et al.-style massive activation in block 1's MLP,
nothing downloaded): the page carries the headline, the sensitivity tables, the verified
recommendation, the predictor table and the real-int8 cross-check."""

from __future__ import annotations

import json

import pytest
import torch

from outlierlab.cli import main

pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

from tiny_llama import EOS, PLANT_LAYER, plant_massive, tiny_llama, write_gguf  # noqa: E402

SMALL = ["--seq-len", "32", "--eval-windows", "4", "--stats-windows", "2", "--quiet"]


@pytest.fixture(scope="module")
def planted_gguf(tmp_path_factory):
    return write_gguf(plant_massive(tiny_llama(), gain=6.0),
                      tmp_path_factory.mktemp("g") / "planted.gguf")  # fmt: skip


def test_price_sensitivity_page(planted_gguf, tmp_path):
    out = tmp_path / "page"
    assert main(["price", str(planted_gguf), "--out", str(out), *SMALL, "--schemes",
                 "w8a8-tensor", "fp8-dynamic", "--sensitivity"]) == 0  # fmt: skip
    res = json.loads((out / "price.json").read_text())
    sens = res["sensitivity"]
    assert sens["scheme"] == "w8a8-tensor" and sens["windows"] == 2  # --sensitivity-windows 2
    rec = sens["recommendation"]
    assert rec["keep_16bit"][0] == f"model.layers.{PLANT_LAYER}.mlp.down_proj"
    assert rec["verified_recovery"] >= 0.9 and rec["reached"]
    row = next(r for r in res["schemes"] if r["label"] == "w8a8-tensor")
    assert rec["check_full_ppl"] == row["quant_ppl"]  # the row's evaluation, reused
    assert rec["check_windows"] == 4 and rec["check_ppl"] > 1  # every window, with the set kept
    assert {r["key"] for r in res["predictors"]["rows"]} >= {"kurtosis", "output_error"}
    assert len(res["predictors"]["blocks"]) == 3
    assert "sensitivity" in res["stage_seconds"]
    md = (out / "price.md").read_text()
    lead = md.splitlines()[2]  # the headline, under the title
    assert lead.startswith("**") and "within 1 % of FP perplexity" in lead
    assert f"of 21 linears in 16-bit (model.layers.{PLANT_LAYER}.mlp.down_proj" in lead
    assert "The largest activation" in lead and "token 0" in lead
    assert "Which measurement predicts the damage" in md and "What to keep in 16-bit" in md
    assert (out / "price_sensitivity.png").stat().st_size > 0


def test_crosscheck_agrees_with_torchao(tmp_path):
    pytest.importorskip("torchao")
    from outlierlab.quant import calibrate, logits_of, perplexity, scheme, wrap
    from outlierlab.quant.crosscheck import torchao_int8_perplexity

    model = tiny_llama()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (4, 33), generator=g)
    x[:, 0] = EOS
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = torchao_int8_perplexity(model, x[:, :-1], x[:, 1:], 2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    cfg = scheme("w8a8-dynamic")
    q = wrap(model, cfg)
    calibrate(q, cfg, [], logits_of)
    ours = perplexity(q, x[:, :-1], x[:, 1:], 2)[0]
    fp = perplexity(model, x[:, :-1], x[:, 1:], 2)[0]
    assert real["ppl"] == pytest.approx(ours, rel=0.01)  # within 1 % as on SmolLM2
    assert real["ppl"] != fp  # it really quantised


def test_price_full_and_compare(planted_gguf, tmp_path, capsys):
    pytest.importorskip("torchao")
    other = write_gguf(tiny_llama(seed=1), tmp_path / "plain.gguf")
    out = tmp_path / "cmp"
    rows = ["--schemes", "w8a8-tensor", "w8a8-dynamic"]
    assert main(["price", str(planted_gguf), str(other), "--out", str(out), *SMALL, *rows,
                 "--full", "--no-figures"]) == 0  # fmt: skip
    for name in ("planted", "plain"):
        res = json.loads((out / name / "price.json").read_text())
        assert res["crosscheck"]["ours_ppl"] == res["schemes"][1]["quant_ppl"]
        assert abs(res["crosscheck"]["relative_difference"]) < 0.05
        assert res["sensitivity"]["scheme"] == "w8a8-tensor"
    cmp = (out / "compare.md").read_text()
    assert "| | planted | plain |" in cmp.replace("|  |", "| |")
    assert "16-bit recommendation (verified)" in cmp and "torchao int8 vs ours" in cmp
    page = (out / "planted" / "price.md").read_text()
    assert "Cross-check against a real int8 implementation" in page
    assert "compare page:" in capsys.readouterr().out


def test_price_options_refused_in_one_line(planted_gguf, capsys, monkeypatch):
    assert main(["price", str(planted_gguf), "--sensitivity", "w4a4-quarot"]) == 2
    err = capsys.readouterr().err
    assert "--sensitivity 'w4a4-quarot' is not allowed; allowed: w8a8-tensor" in err
    assert len(err.strip().splitlines()) == 1
    assert main(["price", str(planted_gguf), str(planted_gguf)]) == 2
    assert "the same model twice" in capsys.readouterr().err
    import outlierlab.quant.crosscheck as cc

    monkeypatch.setattr(cc, "torchao_available", lambda: False)  # as on a machine without it
    assert main(["price", str(planted_gguf), "--crosscheck"]) == 2
    assert "--crosscheck needs torchao; install it with pip install 'outlierlab[crosscheck]'" in (
        capsys.readouterr().err)  # fmt: skip
