"""load_model: outlierlab model/run folders (finished and not) and HF folders; one protocol."""

from __future__ import annotations

import json

import pytest
import torch

from outlierlab.errors import ModelLoadError
from outlierlab.loading import load_model
from outlierlab.model import GPT, GPTConfig

CFG = dict(vocab_size=300, n_layer=1, d_model=16, n_head=2, d_mlp=32, seq_len=8)


def gpt(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig.preset("pre-ln", **CFG))


def run_config(tokenizer="bytes"):
    cfg = GPTConfig.preset("pre-ln", **CFG).to_dict()
    return json.dumps({"model": cfg, "data": {"source": "stdlib", "tokenizer": tokenizer}})


def test_saved_gpt_and_unfinished_run(tmp_path):
    saved = tmp_path / "saved"
    gpt(0).save(saved)
    lm = load_model(saved)
    assert lm.kind == "outlierlab" and lm.seq_len == 8 and not lm.model.training
    assert lm.tokenizer.decode(lm.tokenizer.encode("héllo")) == "héllo"  # bytes by default
    idx = torch.tensor([lm.tokenizer.encode("abc")])
    assert lm.logits(idx).shape == (1, 3, 300)

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text(run_config())
    with pytest.raises(ModelLoadError, match="no final model and no checkpoint"):
        load_model(run)
    for step, seed in ((3, 1), (5, 2)):
        d = run / "checkpoints" / f"step-{step}"
        gpt(seed).save(d)
        (d / "state.json").write_text("{}")
    got = load_model(run)
    assert got.path == run
    torch.testing.assert_close(got.model.tok_emb.weight, gpt(2).tok_emb.weight)  # latest


def test_run_with_tokenizer_json(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["some words and more words"] * 10,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "<|endoftext|>"]),
    )
    run = tmp_path / "run"
    gpt(0).save(run)
    (run / "config.json").write_text(run_config("bpe"))
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        load_model(run)
    tok.save(str(run / "tokenizer.json"))
    lm = load_model(run)
    assert lm.tokenizer.vocab_size == tok.get_vocab_size()
    assert lm.tokenizer.encode("words") == tok.encode("words").ids


def test_hf_folder_protocol(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["a b c d e"], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>"
    )
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=16, n_positions=32)
    folder = tmp_path / "hf"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    lm = load_model(folder)
    assert lm.kind == "hf" and lm.seq_len == 32 and not lm.model.training
    assert lm.tokenizer.eot_id == fast.eos_token_id and lm.tokenizer.vocab_size == len(fast)
    ids = lm.tokenizer.encode("a b c")
    assert lm.tokenizer.decode(ids).split() == ["a", "b", "c"]
    assert lm.logits(torch.tensor([ids])).shape == (1, 3, 16)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError):
        load_model(folder)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="holds no model"):
        load_model(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ModelLoadError, match="not a folder"):
        load_model(tmp_path / "f")
