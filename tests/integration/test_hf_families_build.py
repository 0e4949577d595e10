"""Every causal-LM family transformers ships builds tiny from a config (tests/hf_families.py),
runs on CPU, and round-trips through a local HF folder (safetensors + a tokenizer written by the
test) with identical logits."""

from __future__ import annotations

import time

import pytest
import torch

pytest.importorskip("transformers")

from hf_families import FAMILIES, LAYERS, NUM_HIDDEN_LAYERS, SKIPS, save_tiny, tiny_model

# 193 models built, run, saved and reloaded: 35-60 s on the 2-core machine
pytestmark = [pytest.mark.hf, pytest.mark.slow]

MAX_PARAMS = 5_000_000


def _ids(vocab: int) -> torch.Tensor:
    """(2, 16) ids of the byte tokens (3..258), inside every tiny vocabulary."""
    return torch.randint(3, min(vocab, 259), (2, 16), generator=torch.Generator().manual_seed(0))


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits


@pytest.mark.parametrize(
    "model_type", [pytest.param(f, marks=pytest.mark.skip(SKIPS[f])) if f in SKIPS else f
                   for f in FAMILIES],
)  # fmt: skip
def test_family_builds_runs_and_round_trips(model_type, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    model = tiny_model(model_type)
    cfg = model.config.get_text_config()
    vocab = cfg.vocab_size
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) <= MAX_PARAMS
    expected_layers = NUM_HIDDEN_LAYERS.get(model_type, LAYERS)
    assert getattr(cfg, "num_hidden_layers", None) == expected_layers

    x = _ids(vocab)
    logits = _logits(model, x)
    assert logits.shape == (2, 16, vocab)
    assert torch.isfinite(logits).all()
    t = time.perf_counter()
    _logits(model, x)
    assert time.perf_counter() - t < 1.0

    folder = save_tiny(model_type, tmp_path / model_type)
    assert (folder / "model.safetensors").is_file()
    AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    assert tok.eos_token == "<eos>" and tok.eos_token_id < vocab
    assert max(tok("hello, wörld")["input_ids"]) < vocab
    loaded = type(model).from_pretrained(folder, local_files_only=True, trust_remote_code=False)
    assert torch.equal(_logits(loaded.eval(), x), logits)
