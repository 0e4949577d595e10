"""Tiny random models of every causal-LM family transformers ships, built from a config (nothing
downloaded), and a tiny tokenizer written by the test.

:func:`tiny_config` passes a generic set of size overrides (:data:`SIZES`: 2 layers, width 64,
4 heads, vocab 512, 4 experts top-2 ...) as keyword arguments to each family's config class, so
fields the class derives from them (``layer_types`` lists, head dims) follow; the names a class
does not take are left out. Composite (multimodal) configs get the same overrides in each
sub-config (vision/audio towers smaller still). :data:`OVERRIDES` holds what a family needs beyond
that, with why; :data:`NUM_HIDDEN_LAYERS` the families whose ``num_hidden_layers`` counts something
other than 2 blocks; :data:`SKIPS` the families that cannot be built or run on CPU here, with why.
Where the family's causal-LM class takes the text sub-config (emu3, llama4, mllama, musicgen,
qwen3_5, ...), :func:`tiny_model` builds it from that, as ``AutoModelForCausalLM`` does.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

WIDTH, LAYERS, HEADS, KV_HEADS, HEAD_DIM, MLP, VOCAB = 64, 2, 4, 2, 16, 128, 512
PAD, BOS, EOS = 0, 1, 2

# Generic size overrides: (names, value); every name gets the value where the config class takes
# it as a keyword argument. Families call the same size by different names.
_GROUPS: list[tuple[str, object]] = [
    ("hidden_size d_model n_embd dim embed_dim emb_dim embedding_dim", WIDTH),
    ("num_hidden_layers n_layer n_layers num_layers decoder_layers encoder_layers"
     " num_decoder_layers num_encoder_layers num_blocks", LAYERS),
    ("num_attention_heads n_head n_heads num_heads decoder_attention_heads"
     " encoder_attention_heads num_decoder_attention_heads num_encoder_attention_heads"
     " attention_heads swa_num_attention_heads", HEADS),
    ("num_key_value_heads num_kv_heads swa_num_key_value_heads", KV_HEADS),
    ("head_dim d_head dim_head attention_head_size swa_head_dim", HEAD_DIM),
    ("intermediate_size ffn_dim decoder_ffn_dim encoder_ffn_dim n_inner d_ff d_inner"
     " ffn_hidden_size dim_ff feed_forward_size dff", MLP),
    # mixture of experts: 4 experts of width 32, top-2, one shared expert, one group
    ("moe_intermediate_size shared_expert_intermediate_size expert_ffn_hidden_size"
     " shared_intermediate_size moe_shared_expert_intermediate_size"
     " shared_experts_intermediate_size dense_intermediate_size"
     " prefix_dense_intermediate_size", 32),
    ("num_experts num_local_experts n_routed_experts moe_num_experts", 4),
    ("num_experts_per_tok moe_topk moe_k top_k_experts num_experts_per_token", 2),
    ("n_shared_experts num_shared_experts moe_num_shared_experts n_group topk_group", 1),
    ("first_k_dense_replace", 1),  # one dense layer, then MoE (default: 1 to 3 dense layers)
    # vocabularies: the main one, gemma3n/gemma4 per-layer inputs (262144 by default),
    # inkling2's unpadded head, blt's hashed byte n-grams (3,000,012 rows by default)
    ("vocab_size vocab_size_per_layer_input unpadded_vocab_size encoder_hash_byte_group_vocab",
     VOCAB),
    ("hidden_size_per_layer_input", 16),
    ("hidden_size_global", WIDTH),  # blt's local decoder reads the global transformer's width
    ("max_position_embeddings n_positions n_ctx max_target_positions max_source_positions"
     " max_seq_len context_length", 256),
    # multi-head latent attention (deepseek v2/v3 style): consistent ranks and head dims
    ("q_lora_rank", 32),
    ("kv_lora_rank qk_nope_head_dim v_head_dim", 16),
    ("qk_rope_head_dim", 8),
    # sparse-attention indexers (deepseek v3.2 style: 64 heads × 128 by default), deepseek v4's
    # grouped low-rank output projection
    ("index_n_heads", HEADS),
    ("index_head_dim o_lora_rank", 16),
    ("o_groups", 2),
    # state-space and linear-attention mixers: 4 heads × 32 = 2 × width
    ("state_size mamba_d_state ssm_state_size", 8),
    ("mamba_n_heads mamba_num_heads n_mamba_heads", 4),
    ("mamba_d_head mamba_head_dim", 32),
    ("n_groups mamba_n_groups mamba_ngroups", 1),
    ("linear_num_key_heads linear_num_value_heads linear_num_heads", 2),
    ("linear_key_head_dim linear_value_head_dim linear_head_dim", 16),
    # special tokens inside the vocabulary (some embeddings have a padding_idx)
    ("pad_token_id", PAD),
    ("bos_token_id", BOS),
    ("eos_token_id decoder_start_token_id", EOS),
]  # fmt: skip
SIZES: dict[str, object] = {name: v for names, v in _GROUPS for name in names.split()}

# Vision, audio and other encoder sub-configs of composite configs are made smaller still; the
# text/decoder sub-configs get SIZES.
SUB_SIZES: dict[str, object] = {
    **SIZES,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
_SMALL_SUBS = ("vision", "audio", "vq", "text_encoder", "depth")

# What a family needs beyond SIZES (model_type -> config kwargs; a dict value merges into that
# sub-config), with why.
MLA = {"num_key_value_heads": HEADS}  # latent attention: as many kv heads as query heads
_MLA_FAMILIES = "axk1 axk2 deepseek_v2 deepseek_v3 deepseek_v32 glm4_moe_lite glm_moe_dsa minicpm3"
_MLA_FAMILIES += " sarvam_mla youtu"
_GEMMA4_GLOBAL = {"global_head_dim": 2 * HEAD_DIM}  # global layers' head dim: a popped kwarg, 512
# Hybrid families put softmax attention every 4th-8th layer by default, so 2 derived layers would
# hold linear-attention/mamba/conv mixers only: one of each instead.
_HYBRID = {"layer_types": ["linear_attention", "full_attention"]}
_HYBRID_FAMILIES = "qwen3_5_text qwen3_5_moe_text qwen3_next granitemoehybrid"
_QSA = {  # qwen4_exp's full-attention layers are indexed (QSA): the indexer needs all five sizes
    "indexer_n_heads": HEADS,
    "indexer_kv_heads": 1,
    "indexer_head_dim": HEAD_DIM,
    "indexer_budget": 8,
    "indexer_compress_ratio": 4,
}
OVERRIDES: dict[str, dict] = {
    **dict.fromkeys(_MLA_FAMILIES.split(), MLA),
    **dict.fromkeys(_HYBRID_FAMILIES.split(), _HYBRID),
    "bailing_hybrid": {**_HYBRID, **MLA},  # its full-attention layers are MLA
    "bamba": {"attn_layer_indices": [1]},  # hybrid: mamba, then attention
    "beam": {"mlp_layer_types": ["dense", "sparse"]},  # 3 dense layers first by default
    # partial rotary: rotary_dim (default 64) must fit in the head dim (64 / 4 = 16)
    "codegen": {"rotary_dim": 8},
    # rope parameters are given per layer type
    "cohere_compass_text": {
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    },
    # attention and MoE sizes live in sub-configs with their own names; DbrxAttention reads
    # attn_config.rope_theta (not a field of the class) and clamps q/k/v with clip_qkv (not None)
    "dbrx": {
        "attn_config": {"kv_n_heads": KV_HEADS, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": MLP, "moe_num_experts": 4, "moe_top_k": 2},
    },
    # looped model: 1 prelude layer and a 1-layer core run n_recurrent_loops (2) times; the
    # default 8 prelude + 8 coda layers leave a core of -14 layers that validation accepts
    "dory": {"n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 0},
    # validated: kv heads == query heads; the vision tower's MoE pattern is written out for its
    # 42 default layers; the vision and audio adapters map their width into the text width
    "dots3_note": {
        "text_config": {"num_key_value_heads": HEADS},
        "vision_config": {
            "mlp_layer_types": ["dense"] * LAYERS,
            "adapter_in_dim": 32,
            "adapter_out_dim": WIDTH,
        },
        "audio_config": {"adapter_input_size": 32, "adapter_out_dim": WIDTH},
    },
    "dots3_note_text": {"num_key_value_heads": HEADS},
    # mamba inner width (mamba_d_ssm, default 1024) = heads × head dim = 4 × 32
    "falcon_h1": {"mamba_d_ssm": 128},
    # kv sharing needs unshared layers of each type before it (default 15 shared layers)
    "gemma3n_text": {"num_kv_shared_layers": 0},
    "gemma4": {"text_config": _GEMMA4_GLOBAL},
    # the drafter runs only with the per-layer-input embedding off; its default config (no
    # text model type given) fails its own validation
    "gemma4_assistant": {
        "text_config": {
            "model_type": "gemma4_text",
            "hidden_size_per_layer_input": 0,
            "vocab_size_per_layer_input": 0,
        }
    },
    "gemma4_text": _GEMMA4_GLOBAL,
    # the vision embedder's widths and position table have their own names
    "gemma4_unified": {
        "text_config": _GEMMA4_GLOBAL,
        "vision_config": {
            "mm_embed_dim": 32,
            "output_proj_dims": 32,
            "mm_posemb_size": 64,
            "patch_size": 4,
        },
    },
    "gemma4_unified_text": _GEMMA4_GLOBAL,
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1},  # hybrid, as _HYBRID
    "kimi_linear": {**_HYBRID, **MLA},  # its full-attention layers are MLA
    # the local/global pattern is a list of ([types], repeats) covering num_layers
    "gpt_neo": {"attention_types": [[["global", "local"], 1]]},
    "gptj": {"rotary_dim": 8},  # as codegen
    # a recurrent model: the 2-layer H and L stacks run H_cycles × (L_cycles + 1) times
    "hrm_text": {"H_cycles": 1, "L_cycles": 1},
    # hybrid: one short-conv layer, one attention layer (lfm2_moe's default is not even derived
    # from num_hidden_layers); lfm2_moe's first num_dense_layers (2) are dense
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"], "num_dense_layers": 1},
    "lfm3": {"layer_types": ["conv", "full_attention"]},
    # a sliding-window layer, then an indexed (sparse) one that selects its own key pool: by
    # default every 5th layer is indexed, so 2 derived layers would both slide; its indexer scores
    # with at most the query heads of key head 0 (4 / 2), and its pool and window sizes are scaled
    # to short sequences; the first layer keeps its dense MLP, the second is MoE
    "kolibri1_1": {
        "layer_types": ["sliding_attention", "indexed_attention"],
        "index_layers": [1],
        "kv_source_layers": [0, 1],
        "mlp_only_layers": [0],
        "mlp_only_intermediate_size": MLP,
        "sliding_window": 8,
        "index_num_heads": HEADS // KV_HEADS,
        "index_topk": 4,
        "index_pool_size": 16,
        "index_compression": 4,
        "index_num_local_tokens": 4,
        "index_num_sink_tokens": 2,
    },
    # MLA, and the rotary embedding is head_dim wide: the rope part of the head; the router also
    # scores zero_expert_num identity ("zero-compute") experts, 256 by default
    "longcat_flash": {**MLA, "head_dim": 8, "zero_expert_num": 2},
    # inner width hidden × expand (128) = heads × head dim
    "mamba2": {"head_dim": 32},
    # input ids are (batch × codebooks, length): one codebook
    "musicgen": {"decoder": {"num_codebooks": 1}},
    "musicgen_melody": {"decoder": {"num_codebooks": 1}},
    # the LM head asserts is_decoder; attn_layers (6 by default) sets the depth; the axial
    # position embedding's dims sum to the width and its shape multiplies to the max length
    "reformer": {
        "is_decoder": True,
        "attn_layers": ["local", "lsh"],
        "axial_pos_embds_dim": [32, 32],
        "axial_pos_shape": [16, 16],
        "local_attn_chunk_length": 16,
        "lsh_attn_chunk_length": 16,
        "num_buckets": 4,
    },
    "qwen3_5": {"text_config": _HYBRID},
    "qwen3_5_moe": {"text_config": _HYBRID},
    "qwen4_exp": {"text_config": {**_HYBRID, **_QSA}},
    "qwen4_exp_text": {**_HYBRID, **_QSA},
    "recurrent_gemma": {"block_types": ["recurrent", "attention"]},  # hybrid, as _HYBRID
    # the pronunciation and glyph-shape embeddings have their own vocabularies and widths
    "roc_bert": {
        "pronunciation_vocab_size": 64,
        "pronunciation_embed_dim": 16,
        "shape_vocab_size": 64,
        "shape_embed_dim": 16,
    },
    # the language adapters need a default language
    "xmod": {"default_language": "en_XX"},
    # the default block pattern is written out (3 entries); every hybrid layer's shared
    # transformer is tied to the first one's, which fails unless there are two hybrid layers
    "zamba": {"layers_block_type": ["hybrid", "hybrid"]},
    # the default block pattern is written out (54 entries): one mamba, one hybrid block
    "zamba2": {"layers_block_type": ["mamba", "hybrid"]},
    # only top-1 routing is implemented
    "zaya": {"num_experts_per_tok": 1},
}

# config.num_hidden_layers where it is not LAYERS (the family counts differently), with why.
NUM_HIDDEN_LAYERS: dict[str, int | None] = {
    "blt": None,  # no top-level depth: patcher, local encoder/decoder and global sub-configs
    "hrm_text": 4,  # counts unrolled applications: 2 per stack × H_cycles 1 × (L_cycles 1 + 1)
    "longcat_flash": 4,  # each of the num_layers = 2 layers holds two attention+MLP sublayers
    "nemotron_h": 4,  # one block per mixer: mamba, MoE, attention, MLP (the default pattern)
}

SKIPS: dict[str, str] = {
    "gemma3n": "its vision tower is a TimmWrapperModel: needs the timm package (not installed)",
    "gemma4_assistant": "a speculative-decoding drafter: forward needs the target model's "
    "inputs_embeds and shared_kv_states",
    "gemma4_unified_assistant": "a speculative-decoding drafter: forward needs the target "
    "model's inputs_embeds and shared_kv_states",
}


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
    """Keyword arguments for composite config ``cls``: each sub-config as a small dict (an
    ``AutoConfig`` slot gets the sizes of the model type ``cls`` puts there by default)."""
    from transformers import CONFIG_MAPPING

    out, default = {}, None
    for name, sub in getattr(cls, "sub_configs", {}).items():
        if sub.__name__ == "AutoConfig":
            sub_type = sizes.get(name, {}).get("model_type")
            if sub_type is None:
                default = default or cls()
                sub_type = getattr(getattr(default, name, None), "model_type", None)
            if sub_type is None:
                continue
            out[name] = {"model_type": sub_type}
            sub = CONFIG_MAPPING[sub_type]
        else:
            out[name] = {}
        small = any(k in name for k in _SMALL_SUBS)
        out[name].update(_kwargs_for(sub, SUB_SIZES if small else sizes))
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


def model_class_and_config(model_type: str):
    """The family's causal-LM class and the tiny config it is built from: the text sub-config
    where the class takes that (as ``AutoModelForCausalLM.from_config`` does)."""
    import transformers

    cfg = tiny_config(model_type)
    cls = getattr(transformers, _mapping()[model_type])
    if cls.config_class is not type(cfg) and cls.config_class in cfg.sub_configs.values():
        cfg = cfg.get_text_config(decoder=True)
    return cls, cfg


def tiny_model(model_type: str, seed: int = 0):
    """The family's ``*ForCausalLM`` (the class in the auto mapping), seeded, float32, eval."""
    cls, cfg = model_class_and_config(model_type)
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
