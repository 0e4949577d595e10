"""Tiny random models of every causal-LM family transformers ships, built from a config (nothing
downloaded), and a tiny tokenizer written by the test.

:func:`tiny_config` passes a generic set of size overrides (:data:`SIZES`: 2 layers, width 64,
4 heads, vocab 512, 4 experts top-2 ...) as keyword arguments to each family's config class, so
fields the class derives from them (``layer_types`` lists, head dims) follow; the names a class
does not take are left out. Composite (multimodal) configs get the same overrides in each
sub-config. :data:`OVERRIDES` holds what a family needs beyond that, one commented line each;
:data:`SKIPS` the families that cannot be built or run on CPU here, with the reason.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

WIDTH, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 64, 2, 4, 2, 16, 128, 512
PAD, BOS, EOS = 0, 1, 2

# Generic size overrides: every name in a group gets the value, where the config class takes it.
SIZES: dict[str, object] = {
    **dict.fromkeys(
        ("hidden_size", "d_model", "n_embd", "dim", "embed_dim", "emb_dim", "embedding_dim"),
        WIDTH,
    ),
    **dict.fromkeys(
        ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers",
         "encoder_layers", "num_decoder_layers", "num_encoder_layers", "num_blocks"),
        LAYERS,
    ),  # fmt: skip
    **dict.fromkeys(
        ("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
         "encoder_attention_heads", "num_decoder_attention_heads",
         "num_encoder_attention_heads", "attention_heads"),
        HEADS,
    ),  # fmt: skip
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads"), KV_HEADS),
    **dict.fromkeys(("head_dim", "d_head", "dim_head", "attention_head_size"), HEAD_DIM),
    **dict.fromkeys(
        ("intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "n_inner", "d_ff",
         "d_inner", "ffn_hidden_size", "dim_ff", "feed_forward_size", "dff"),
        MLP,
    ),  # fmt: skip
    **dict.fromkeys(
        ("moe_intermediate_size", "shared_expert_intermediate_size", "expert_ffn_hidden_size",
         "shared_intermediate_size", "moe_shared_expert_intermediate_size",
         "shared_experts_intermediate_size", "dense_intermediate_size",
         "prefix_dense_intermediate_size"),
        32,
    ),  # fmt: skip
    **dict.fromkeys(
        ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4
    ),
    **dict.fromkeys(
        ("num_experts_per_tok", "moe_topk", "moe_k", "top_k_experts", "num_experts_per_token"), 2
    ),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "moe_num_shared_experts"), 1),
    **dict.fromkeys(("n_group", "topk_group"), 1),
    **dict.fromkeys(("vocab_size",), VOCAB),
    **dict.fromkeys(
        ("max_position_embeddings", "n_positions", "n_ctx", "max_target_positions",
         "max_source_positions", "max_seq_len", "context_length"),
        256,
    ),  # fmt: skip
    # multi-head latent attention (deepseek v2/v3 style): consistent ranks and head dims
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    # state-space / linear-attention mixers
    **dict.fromkeys(("state_size", "mamba_d_state", "ssm_state_size"), 8),
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads", "n_mamba_heads"), 4),
    **dict.fromkeys(("mamba_d_head", "mamba_head_dim"), 32),
    **dict.fromkeys(("linear_num_key_heads", "linear_num_value_heads", "linear_num_heads"), 2),
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"), 16),
    "pad_token_id": PAD,
    "bos_token_id": BOS,
    "eos_token_id": EOS,
    "decoder_start_token_id": EOS,
}

# Sub-configs of composite (vision/audio + text) configs are made smaller still.
SUB_SIZES: dict[str, object] = {
    **SIZES,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
}

# What a family needs beyond SIZES (model_type -> config kwargs), with why.
OVERRIDES: dict[str, dict] = {}

SKIPS: dict[str, str] = {}


def _mapping() -> dict[str, str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _families() -> list[str]:
    try:
        return sorted(_mapping())
    except ImportError:
        return []


FAMILIES: list[str] = _families()


def _kwargs_for(cls, sizes: dict) -> dict:
    """The entries of ``sizes`` that config class ``cls`` takes as keyword arguments."""
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in sizes.items() if k in params}


def _sub_kwargs(cls, sizes: dict) -> dict:
    """Keyword arguments for composite config ``cls``: each sub-config as a small dict."""
    out = {}
    for name, sub in getattr(cls, "sub_configs", {}).items():
        if sub.__name__ == "AutoConfig":
            continue
        out[name] = _kwargs_for(sub, SUB_SIZES if name != "text_config" else sizes)
    return out


def tiny_config(model_type: str):
    """A small deterministic config of ``model_type`` (see the module docstring)."""
    from transformers import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    extra = dict(OVERRIDES.get(model_type, {}))
    sizes = {**SIZES, **extra}
    kwargs = {**_kwargs_for(cls, sizes), **_sub_kwargs(cls, sizes)}
    kwargs.update({k: v for k, v in extra.items() if not isinstance(v, dict)})
    for name, sub in extra.items():  # a dict override of a sub-config merges into it
        if isinstance(sub, dict):
            kwargs[name] = {**kwargs.get(name, {}), **sub}
    return cls(**kwargs)


def tiny_model(model_type: str, seed: int = 0):
    """The family's ``*ForCausalLM`` (the class in the auto mapping), seeded, float32, eval."""
    import transformers

    cfg = tiny_config(model_type)
    cls = getattr(transformers, _mapping()[model_type])
    torch.manual_seed(seed)
    model = cls._from_config(cfg, dtype=torch.float32)
    return model.eval()


def tiny_tokenizer(vocab_size: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` of ``<pad>``, ``<bos>``, ``<eos>`` (ids 0-2,
    as the tiny configs set them) and the 256 byte symbols, with ``eos_token`` set; needs
    ``vocab_size`` ≥ 259."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    specials = ["<pad>", "<bos>", "<eos>"]
    symbols = specials + list(bytes_to_unicode().values())
    if len(symbols) > vocab_size:
        raise ValueError(f"tiny_tokenizer needs vocab_size >= {len(symbols)}, got {vocab_size}")
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    )


def save_tiny(model_type: str, folder) -> Path:
    """Write :func:`tiny_model` (safetensors) and :func:`tiny_tokenizer` to ``folder``."""
    folder = Path(folder)
    model = tiny_model(model_type)
    model.save_pretrained(folder, safe_serialization=True)
    vocab = model.config.get_text_config().vocab_size
    tiny_tokenizer(vocab).save_pretrained(folder)
    return folder
