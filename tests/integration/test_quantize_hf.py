"""A random-init tiny HF GPT-2 folder (with a tokenizer built here, nothing downloaded)
quantises and evaluates end to end through the CLI; its Conv1D layers are handled exactly."""

from __future__ import annotations

import hashlib
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from outlierlab.cli import main

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf


def _corpus(folder: Path) -> Path:
    folder.mkdir()
    lib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(lib.glob("*.py"))[:30]:
        (folder / f"{f.stem}.txt").write_text(f.read_text(errors="ignore")[:4000])
    return folder


def _hf_folder(path: Path, corpus: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    tok.train([str(p) for p in sorted(corpus.glob("*.txt"))], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>"
    )
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=len(fast), n_layer=2, n_embd=32, n_head=2, n_positions=64,
        bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quant_hf")
    corpus = _corpus(tmp / "corpus")
    return _hf_folder(tmp / "gpt2-tiny", corpus), corpus


def test_hf_gpt2_quantises_end_to_end(hf_dir, tmp_path, monkeypatch, capsys):
    folder, corpus = hf_dir
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(tmp_path / "cache"))
    before = _hashes(folder)
    out = tmp_path / "q.json"
    argv = ["quantize", str(folder), "--data", str(corpus), "--seq-len", "32"]
    argv += ["--eval-windows", "8", "--calib-batches", "2", "--batch-size", "4"]
    argv += ["--stats-windows", "4", "--scheme", "w8a8-dynamic", "--quantize-residual"]
    argv += ["--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "FP perplexity" in printed and "quant perplexity" in printed
    result = json.loads(out.read_text())
    assert result["kind"] == "hf" and result["scheme"] == "w8a8-dynamic"
    assert result["config"]["a_granularity"] == "token"
    names = [row["name"] for row in result["layers"]]
    assert names[:4] == [
        f"transformer.h.0.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    ]
    assert "lm_head" not in names
    # HF GPT-2's residual stream (embedding output, every block) is quantised too
    resid = [row["name"] for row in result["layers"] if row["kind"] == "residual"]
    assert resid == ["embed.resid_post", "blocks.0.resid_post", "blocks.1.resid_post"]
    # a random model is near-uniform over the vocabulary, and 8 bits barely move it
    assert 0.5 * result["fp_ppl"] < result["quant_ppl"] < 1.5 * result["fp_ppl"]
    assert _hashes(folder) == before  # nothing written into the HF folder


def test_conv1d_becomes_an_exact_linear(hf_dir):
    from outlierlab.quant import QuantConfig
    from outlierlab.quant.wrap import QuantLinear, is_conv1d

    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir[0], local_files_only=True)
    conv = model.transformer.h[0].mlp.c_fc
    assert is_conv1d(conv)
    ql = QuantLinear.from_module(conv, QuantConfig())
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        torch.testing.assert_close(ql(x), conv(x))  # quantisers off, weight not yet quantised
    assert (ql.out_features, ql.in_features) == (128, 32)


@pytest.mark.parametrize("name", ["smoothquant-search", "w4a16-gptq", "fp8-tensor"])
def test_serving_schemes_through_the_cli(hf_dir, tmp_path, monkeypatch, capsys, name):
    folder, corpus = hf_dir
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "q.json"
    argv = ["quantize", str(folder), "--data", str(corpus), "--seq-len", "32", "--quiet"]
    argv += ["--eval-windows", "4", "--calib-batches", "2", "--batch-size", "4"]
    argv += ["--stats-windows", "2", "--scheme", name, "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["scheme"] == name and result["quant_ppl"] > 1
    if name == "smoothquant-search":  # the chosen α is in the JSON and printed
        assert result["smooth_alpha"] in (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
        assert f"SmoothQuant α     {result['smooth_alpha']}" in printed


def test_unknown_scheme_is_one_line_naming_the_allowed(hf_dir, capsys):
    folder, _ = hf_dir
    assert main(["quantize", str(folder), "--scheme", "int3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown scheme 'int3'" in err[0] and "w4a4-quarot" in err[0]
