"""Export of a GPT-2-compatible GPT to a Hugging Face folder."""

from __future__ import annotations

import pytest
import torch

from outlierlab.errors import ConfigError
from outlierlab.model import GPT, GPTConfig
from outlierlab.model.hf_export import check_gpt2_compatible, export_hf

pytestmark = pytest.mark.hf
TINY = {"vocab_size": 64, "n_layer": 2, "d_model": 32, "n_head": 4, "seq_len": 16}


@pytest.mark.slow  # the first import of transformers takes seconds
@pytest.mark.parametrize(
    "overrides",
    [{}, {"activation": "gelu_tanh", "tie_embeddings": False, "bias": True, "d_mlp": 48}],
)
def test_exported_gpt2_gives_the_same_logits(tmp_path, overrides):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("pre-ln", **TINY, **overrides)).eval()
    with torch.no_grad():  # non-trivial gains and biases, so a layout mistake shows
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    export_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert type(hf).__name__ == "GPT2LMHeadModel"
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, model(idx), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "overrides", "field"),
    [
        ("op", {}, "block"),
        ("pre-rms", {}, "norm"),
        ("pre-ln", {"qk_norm": True}, "qk_norm"),
        ("pre-ln", {"beta": 0.5}, "beta"),
        ("pre-ln", {"pos_encoding": "rotary"}, "pos_encoding"),
    ],
)
def test_incompatible_configs_name_the_field(preset, overrides, field):
    with pytest.raises(ConfigError, match=rf"model\.{field}=.*GPT-2"):
        check_gpt2_compatible(GPTConfig.preset(preset, **overrides))
