"""Export a GPT-2-compatible outlierlab GPT to a Hugging Face folder (``GPT2LMHeadModel``).

Compatible means the ``pre-ln`` shape of GPT-2: pre blocks with affine layernorm, a final
norm, learned positions, β = 1 (fixed), no QK-Norm, no soft-cap. Missing biases are written
as zeros. ``transformers`` is imported only here.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from outlierlab.errors import ConfigError
from outlierlab.model.config import GPTConfig
from outlierlab.model.gpt import GPT, LN_EPS

HF_ACTIVATIONS = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu", "silu": "silu"}

# field → (required value, why); checked in this order
_REQUIRED = {
    "block": ("pre", "GPT-2 is pre-norm"),
    "norm": ("layernorm", "GPT-2 uses LayerNorm"),
    "norm_affine": (True, "GPT-2's LayerNorm has weights"),
    "final_norm": (True, "GPT-2 has ln_f"),
    "pos_encoding": ("learned", "GPT-2 has a learned position table"),
    "qk_norm": (False, "GPT-2 has no QK-Norm"),
    "logit_softcap": (None, "GPT-2 has no soft-cap"),
    "beta_trainable": (False, "GPT-2 has no branch gain"),
    "attn": ("softmax", "GPT-2's attention is a softmax"),
    "attn_gate": ("none", "GPT-2 has no attention gate"),
    "attn_bias_kv": (False, "GPT-2 has no attention bias"),
    "embed_proj": (False, "GPT-2 has no embedding projection"),
}


def check_gpt2_compatible(cfg: GPTConfig) -> None:
    """Raise ``ConfigError`` naming the first field that GPT-2 cannot express."""
    for field, (value, why) in _REQUIRED.items():
        if getattr(cfg, field) != value:
            raise ConfigError(
                f"model.{field}={getattr(cfg, field)!r} cannot be exported to GPT-2 ({why}); "
                f"allowed: {value!r}"
            )
    if cfg.beta_value != 1.0:
        raise ConfigError(
            f"model.beta={cfg.beta!r} cannot be exported to GPT-2 (no branch gain); allowed: 1.0"
        )


def export_hf(model: GPT, directory: str | os.PathLike, eos_token_id: int | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` loadable by
    ``transformers.AutoModelForCausalLM.from_pretrained(directory)``; returns the folder."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    check_gpt2_compatible(cfg)
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.seq_len,
        n_embd=cfg.d_model,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=cfg.mlp_width,
        activation_function=HF_ACTIVATIONS[cfg.activation],
        resid_pdrop=cfg.dropout,
        embd_pdrop=cfg.dropout,
        attn_pdrop=cfg.dropout,
        layer_norm_epsilon=LN_EPS,
        initializer_range=cfg.init_std,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )
    hf = GPT2LMHeadModel(hf_cfg)
    hf.load_state_dict(_gpt2_state_dict(model), strict=True)
    out = Path(directory)
    hf.save_pretrained(out)
    return out


def _gpt2_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """Our names and layouts → GPT-2's (``Conv1D`` weights are stored (in, out))."""

    def lin(prefix: str, linear: torch.nn.Linear) -> dict[str, torch.Tensor]:
        w = linear.weight.detach()
        b = linear.bias.detach() if linear.bias is not None else torch.zeros(w.shape[0])
        return {f"{prefix}.weight": w.t().contiguous(), f"{prefix}.bias": b.clone()}

    def ln(prefix: str, norm: torch.nn.LayerNorm) -> dict[str, torch.Tensor]:
        w = norm.weight.detach()
        b = norm.bias.detach() if norm.bias is not None else torch.zeros_like(w)
        return {f"{prefix}.weight": w.clone(), f"{prefix}.bias": b.clone()}

    sd = {
        "transformer.wte.weight": model.tok_emb.weight.detach().clone(),
        "transformer.wpe.weight": model.pos_emb.weight.detach().clone(),
        "lm_head.weight": model.lm_head.weight.detach().clone(),
        **ln("transformer.ln_f", model.final_norm),
    }
    for i, block in enumerate(model.blocks):
        p = f"transformer.h.{i}"
        sd |= ln(f"{p}.ln_1", block.attn_norm) | ln(f"{p}.ln_2", block.mlp_norm)
        sd |= lin(f"{p}.attn.c_attn", block.attn.qkv) | lin(f"{p}.attn.c_proj", block.attn.proj)
        sd |= lin(f"{p}.mlp.c_fc", block.mlp.fc) | lin(f"{p}.mlp.c_proj", block.mlp.proj)
    return sd
