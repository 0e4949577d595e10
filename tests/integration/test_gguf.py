"""GGUF input: a tiny Llama written as a GGUF file here (``gguf.GGUFWriter``) loads through
``load_model``, ``measure`` and ``quantize`` exactly like the HF model it came from."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from outlierlab.cli import main
from outlierlab.errors import ModelLoadError

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytestmark = pytest.mark.hf

from tiny_llama import EOS, PLANT_CHANNEL, tiny_llama, write_gguf  # noqa: E402


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gguf")
    return write_gguf(tiny_llama(planted=True), folder / "tiny.gguf")


def test_load_model_gguf_file_and_folder_equal_the_hf_model(gguf_file, tmp_path):
    from outlierlab.loading import load_model

    ref = tiny_llama(planted=True)
    x = torch.randint(0, EOS, (2, 12))
    for path in (gguf_file, gguf_file.parent):  # the file, or the folder holding only it
        loaded = load_model(path)
        assert loaded.kind == "gguf" and loaded.path == gguf_file and loaded.seq_len == 64
        assert not loaded.model.training
        torch.testing.assert_close(loaded.logits(x), ref(x).logits, rtol=0, atol=1e-5)
        assert loaded.tokenizer.eot_id == EOS
        assert loaded.tokenizer.encode("ab") == [ord("a"), ord("b")]
    two = tmp_path / "two"
    two.mkdir()
    shutil.copy(gguf_file, two / "a.gguf")
    shutil.copy(gguf_file, two / "b.gguf")
    with pytest.raises(ModelLoadError, match="2 GGUF files"):
        load_model(two)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot load the GGUF file"):
        load_model(bad)


def test_measure_gguf_defaults_to_stdlib_and_finds_the_planted_channel(gguf_file, tmp_path, capsys):
    out = tmp_path / "m.json"
    rc = main(["measure", str(gguf_file), "--max-tokens", "512", "--seq-len", "64",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    rep = json.loads(out.read_text())
    assert rep["tokens"] == 512
    block1 = next(p for p in rep["points"] if p["name"] == "blocks.1.resid_post")
    assert block1["outlier_neurons"][0] == PLANT_CHANNEL
    assert block1["kurtosis"] > 10
    assert "tiny.gguf" in capsys.readouterr().out


def test_quantize_gguf(gguf_file, tmp_path):
    out = tmp_path / "q.json"
    rc = main(["quantize", str(gguf_file), "--eval-windows", "4", "--calib-batches", "2",
               "--batch-size", "2", "--seq-len", "32", "--quiet", "--json", str(out)])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["kind"] == "gguf" and res["eval_windows"] == 4
    assert res["fp_ppl"] > 1 and res["quant_ppl"] > 1
    assert any(r["name"].endswith("down_proj") for r in res["layers"])


def test_broken_gguf_is_a_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF but truncated")
    assert main(["measure", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot load the GGUF file" in err and len(err.splitlines()) == 1


def test_measure_profile_on_gguf(gguf_file, tmp_path, capsys):
    out = tmp_path / "p.json"
    rc = main(["measure", str(gguf_file), "--max-tokens", "256", "--seq-len", "32", "--profile",
               "--json", str(out)])  # fmt: skip
    assert rc == 0
    prof = json.loads(out.read_text())["profile"]
    by_name = {p["name"]: p for p in prof["points"]}
    assert by_name["blocks.1.resid_post"]["top"][0]["channel"] == PLANT_CHANNEL
    assert by_name["blocks.1.resid_post"]["max_median_ratio"] > 20
    assert [a["layer"] for a in prof["attention"]] == [f"blocks.{i}.attn" for i in range(3)]
    assert all(a["heads"] == 4 and 0 <= a["mass_token0"] <= 1 for a in prof["attention"])
    assert "attention sinks" in capsys.readouterr().out


def test_profile_hf_attention_equals_eager_attentions_and_restores_sdpa():
    from outlierlab.profile import profile

    model = tiny_llama()
    assert model.config._attn_implementation == "sdpa"
    x = torch.randint(0, EOS, (3, 20))
    res = profile(model, x, batch_size=2)
    assert model.config._attn_implementation == "sdpa"
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=x, output_attentions=True).attentions
    for layer, a in zip(res["attention"], att):
        want = a.double()[:, :, 1:, 0].mean((0, 2))
        torch.testing.assert_close(
            torch.tensor(layer["mass_token0_per_head"], dtype=torch.float64), want
        )
