"""Tiny random-init HF causal LMs of the architectures transformers' GGUF loader reads, and a
writer that stores any of them as an F32 GGUF file the way llama.cpp's ``convert_hf_to_gguf.py``
would (nothing downloaded).

:func:`write_gguf` writes the architecture's ``<arch>.*`` hyper-parameters, the tensors under
llama.cpp names (``gguf.get_tensor_name_map``) with llama.cpp's own transformations, which
transformers reverses on load (``modeling_gguf_pytorch_utils``' ``TensorProcessor`` classes):

- q/k rows permuted to llama.cpp's rotary layout (llama, mistral);
- Bloom's per-head interleaved ``query_key_value`` regrouped as q | k | v;
- GPT-2's ``Conv1D`` weights transposed to ``(out, in)``;
- Gemma's and Nemotron's norm weights stored as ``w + 1``;
- MoE experts as stacked 3D tensors (``ffn_gate_exps``, ``ffn_up_exps``, ``ffn_down_exps``);
- Mamba's ``A = -exp(A_log)`` and 2D conv kernels, LFM2's 2D short-conv kernels;
- Qwen3.5's linear-attention value heads tiled instead of grouped, its norms as ``w + 1``.

Fused tensors stay fused where the HF model and llama.cpp both fuse them (Phi-3's ``qkv_proj``
and ``gate_up_proj``, Bloom's, Falcon's and GPT-2's qkv). The tokenizer is tiny_llama's: a
byte-level BPE (``tokenizer.ggml.model = gpt2``) of the 256 byte symbols, one merge and ``<eos>``.

:func:`tiny_hf` builds a seeded tiny model per architecture (vocab 258, width 32, 2–4 layers)
whose config fields are the ones the GGUF carries, or the config class's defaults where
transformers reads nothing from the file (e.g. Qwen2-MoE's expert widths), so the model loaded
back from the GGUF is the same model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

VOCAB, EOS = 258, 257  # 256 bytes, one merge ("  "), <eos>

_COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
               bos_token_id=EOS, eos_token_id=EOS, tie_word_embeddings=False,
               initializer_range=0.3)  # fmt: skip  # O(1) logits and attention scores

# HF model_type → config overrides on _COMMON (None: drop the key). Fields a GGUF does not carry
# for the architecture keep the config class's default.
CONFIGS: dict[str, dict] = {
    "llama": dict(rms_norm_eps=1e-5, rope_theta=10000.0),
    "mistral": dict(rms_norm_eps=1e-5, rope_theta=10000.0),
    "qwen2": dict(rms_norm_eps=1e-6, rope_theta=10000.0),
    # head_dim, expert widths, GPT-2's n_positions / n_inner, StarCoder2's and StableLM's rotary
    # settings: transformers does not read them from the file, outlierlab.gguf does (UNREAD)
    "qwen3": dict(rms_norm_eps=1e-6, rope_theta=10000.0, head_dim=16),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, rope_theta=10000.0,
                      moe_intermediate_size=16, shared_expert_intermediate_size=48),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, head_dim=16, norm_topk_prob=True,
                      rope_theta=10000.0, moe_intermediate_size=16),
    # Phi3Config's default pad_token_id (32000) must be overridden by the file's
    "phi3": dict(rope_theta=10000.0, pad_token_id=EOS),
    "gemma2": dict(head_dim=8, tie_word_embeddings=True, rope_theta=10000.0),
    "gemma3_text": dict(head_dim=8, tie_word_embeddings=True),
    "stablelm": dict(num_key_value_heads=4, rope_theta=500000.0, partial_rotary_factor=0.5),
    "starcoder2": dict(rope_theta=1e6),
    "nemotron": dict(),
    "falcon": dict(num_key_value_heads=None, max_position_embeddings=None,
                   intermediate_size=None, tie_word_embeddings=True),
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=48, hidden_size=None,
                 num_hidden_layers=None, num_attention_heads=None, num_key_value_heads=None,
                 intermediate_size=None, max_position_embeddings=None, tie_word_embeddings=True),
    # Bloom: transformers reads no MLP width (4 × width) and no context
    "bloom": dict(n_layer=2, n_head=4, num_hidden_layers=None, num_attention_heads=None,
                  num_key_value_heads=None, intermediate_size=None, max_position_embeddings=None,
                  tie_word_embeddings=True),
    "mamba": dict(num_attention_heads=None, num_key_value_heads=None, intermediate_size=None,
                  max_position_embeddings=None, state_size=8, tie_word_embeddings=True),
    "minimax_m2": dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8, rotary_dim=8),
    "lfm2": dict(num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"],
                 block_auto_adjust_ff_dim=False, conv_L_cache=3, tie_word_embeddings=True),
    # Qwen3.5: GatedDeltaNet linear attention, full attention every 4th layer (transformers'
    # newer GGUF path, integrations/gguf); rope sections: text positions are the same on each axis
    "qwen3_5_text": dict(num_hidden_layers=4, head_dim=24, linear_num_key_heads=2,
                         linear_num_value_heads=4, linear_key_head_dim=8, linear_value_head_dim=8,
                         linear_conv_kernel_dim=4,
                         layer_types=["linear_attention"] * 3 + ["full_attention"]),
    "qwen3_5_moe_text": dict(num_hidden_layers=4, head_dim=24, linear_num_key_heads=2,
                             linear_num_value_heads=4, linear_key_head_dim=8,
                             linear_value_head_dim=8, linear_conv_kernel_dim=4,
                             layer_types=["linear_attention"] * 3 + ["full_attention"],
                             num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                             shared_expert_intermediate_size=48),
    # transformers' GGUF loader finds no weights for its experts (docs/real-models.md)
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=32,
                    layer_types=["sliding_attention", "full_attention"]),
}
REFUSED = ("gpt_oss",)  # outlierlab refuses the half-loaded model
ARCHS = tuple(a for a in CONFIGS if a not in REFUSED)

# HF model_type → gguf ``general.architecture``
GGUF_ARCH = {"mistral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
             "gemma3_text": "gemma3", "minimax_m2": "minimax-m2", "gpt_oss": "gpt-oss",
             "qwen3_5_text": "qwen35", "qwen3_5_moe_text": "qwen35moe"}  # fmt: skip
_PERMUTE_QK = {"llama", "mistral"}
_NORM_PLUS_ONE = {"gemma2", "gemma3_text", "nemotron"}
_RMS_NORM = {"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "phi3", "gemma2",
             "gemma3_text", "mamba", "lfm2", "minimax_m2", "gpt_oss", "qwen3_5_text",
             "qwen3_5_moe_text"}  # fmt: skip


def tiny_hf(arch: str, seed: int = 0):
    """Seeded tiny HF causal LM of ``arch`` (an HF ``model_type`` in :data:`CONFIGS`), eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = {**_COMMON, **CONFIGS[arch]}
    kw = {k: v for k, v in kw.items() if v is not None}
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(arch, **kw)
    return AutoModelForCausalLM.from_config(cfg).float().eval()


def _get(cfg, *names, default=None):
    return next((v for n in names if (v := getattr(cfg, n, None)) is not None), default)


def _rope(cfg, key: str, default=None):
    """A rotary setting: a config attribute, or in ``rope_parameters`` (transformers 5)."""
    params = getattr(cfg, "rope_parameters", None) or {}
    if isinstance(params, dict) and "rope_theta" not in params:  # gemma3: per attention type
        params = params.get("full_attention", {})
    return _get(cfg, key, default=params.get(key, default))


def _hparams(w, cfg, arch: str) -> None:
    """The ``<arch>.*`` keys llama.cpp's converter writes for ``arch``."""
    d = _get(cfg, "hidden_size", "n_embd")
    layers = _get(cfg, "num_hidden_layers", "n_layer")
    heads = _get(cfg, "num_attention_heads", "n_head", default=0)
    w.add_block_count(layers)
    w.add_embedding_length(d)
    w.add_vocab_size(cfg.vocab_size)
    if arch == "mamba":
        w.add_context_length(2**20)  # llama.cpp: no limit
        w.add_feed_forward_length(0)
        w.add_head_count(0)
        w.add_ssm_conv_kernel(cfg.conv_kernel)
        w.add_ssm_inner_size(cfg.intermediate_size)
        w.add_ssm_state_size(cfg.state_size)
        w.add_ssm_time_step_rank(cfg.time_step_rank)
        w.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
        return
    w.add_context_length(_get(cfg, "max_position_embeddings", "n_positions", "seq_length",
                              default=2048))  # fmt: skip
    w.add_feed_forward_length(_get(cfg, "intermediate_size", "n_inner", "ffn_hidden_size",
                                   default=4 * d))  # fmt: skip
    w.add_head_count(heads)
    kv = _get(cfg, "num_key_value_heads", "num_kv_heads", default=heads)
    if arch == "lfm2":  # one count per layer, 0 on the convolution layers
        kv = [kv if t == "full_attention" else 0 for t in cfg.layer_types]
        w.add_shortconv_l_cache(cfg.conv_L_cache)
    w.add_head_count_kv(kv)
    eps = _get(cfg, "rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon",
               "norm_epsilon")  # fmt: skip
    (w.add_layer_norm_rms_eps if arch in _RMS_NORM else w.add_layer_norm_eps)(eps)
    if (theta := _rope(cfg, "rope_theta")) is not None and arch not in ("gpt2", "bloom"):
        w.add_rope_freq_base(float(theta))
    head_dim = _get(cfg, "head_dim", default=d // heads)
    if getattr(cfg, "head_dim", None) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch not in ("gpt2", "bloom"):
        factor = _rope(cfg, "partial_rotary_factor", 1.0)
        w.add_rope_dimension_count(int(factor * head_dim))
    if (experts := _get(cfg, "num_experts", "num_local_experts")) is not None:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(_get(cfg, "moe_intermediate_size", "intermediate_size"))
        if (shared := getattr(cfg, "shared_expert_intermediate_size", None)) is not None:
            w.add_expert_shared_feed_forward_length(shared)
        if (scoring := getattr(cfg, "scoring_func", None)) is not None:  # MiniMax-M2
            w.add_expert_gating_func({"softmax": 1, "sigmoid": 2}[scoring])
    if (window := getattr(cfg, "sliding_window", None)) is not None:
        w.add_sliding_window(window)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if (value := getattr(cfg, key, None)) is not None:
            getattr(w, f"add_{key}")(value)
    if arch == "stablelm":
        w.add_parallel_residual(bool(cfg.use_parallel_residual))
    if arch.startswith("qwen3_5"):
        w.add_full_attention_interval(cfg.layer_types.index("full_attention") + 1)
        w.add_ssm_conv_kernel(cfg.linear_conv_kernel_dim)
        w.add_ssm_state_size(cfg.linear_key_head_dim)
        w.add_ssm_group_count(cfg.linear_num_key_heads)
        w.add_ssm_time_step_rank(cfg.linear_num_value_heads)
        w.add_ssm_inner_size(cfg.linear_value_head_dim * cfg.linear_num_value_heads)
        rotary = int(_rope(cfg, "partial_rotary_factor", 1.0) * head_dim)
        half = rotary // 2  # mrope sections (time, height, width): three, none empty
        w.add_rope_dimension_sections([half - 2 * (half // 3), half // 3, half // 3, 0])


def _tokenizer(w, pad: int | None) -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    space = byte_chars[ord(" ")]
    w.add_token_list([byte_chars[b] for b in range(256)] + [space * 2, "<eos>"])
    w.add_token_types([1] * 257 + [3])
    w.add_token_merges([f"{space} {space}"])  # transformers needs one merge at least
    w.add_bos_token_id(EOS)
    w.add_eos_token_id(EOS)
    if pad is not None:
        w.add_pad_token_id(pad)


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (convert_hf_to_gguf ``LlamaModel.permute``)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _bloom_qkv(w: np.ndarray, n_head: int, d: int) -> np.ndarray:
    """Bloom's per-head interleaved q/k/v rows regrouped as all q | all k | all v
    (convert_hf_to_gguf ``BloomModel.modify_tensors``)."""
    qkv = w.reshape(n_head, 3, d // n_head, *w.shape[1:])
    return np.concatenate([qkv[:, i].reshape(d, *w.shape[1:]) for i in range(3)])


_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


_OSS_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up|down)_proj(_bias)?")


def _oss_experts(arr: np.ndarray, bid: str, which: str, bias: str | None):
    """GPT-OSS experts as llama.cpp writes them: ``(experts, out, in)`` weights, gate and up
    (interleaved columns in HF) apart."""
    suffix = ".bias" if bias else ".weight"
    if not bias:
        arr = arr.transpose(0, 2, 1)  # HF: (experts, in, out)
    if which == "down":
        yield f"blk.{bid}.ffn_down_exps{suffix}", np.ascontiguousarray(arr)
        return
    gate, up = arr[:, 0::2], arr[:, 1::2]
    yield f"blk.{bid}.ffn_gate_exps{suffix}", np.ascontiguousarray(gate)
    yield f"blk.{bid}.ffn_up_exps{suffix}", np.ascontiguousarray(up)


def _tiled(arr: np.ndarray, cfg, per_element: bool, axis: int = 0) -> np.ndarray:
    """Qwen3.5's value heads from HF's grouped order (key head, value head) to llama.cpp's tiled
    one (value head, key head), on ``axis`` (rows: one per head, or ``per_element``: per value)."""
    k = cfg.linear_num_key_heads
    v = cfg.linear_num_value_heads // k
    d = cfg.linear_value_head_dim if per_element else 1
    moved = np.moveaxis(arr, axis, 0)
    tiled = moved.reshape(k, v, d, *moved.shape[1:]).swapaxes(0, 1).reshape(moved.shape)
    return np.ascontiguousarray(np.moveaxis(tiled, 0, axis))


def _qwen35(arr: np.ndarray, hf_name: str, cfg) -> tuple[np.ndarray, str]:
    """llama.cpp's Qwen3.5 transforms: ``w + 1`` norms (not the linear attention's own), value
    heads tiled, ``A = -exp(A_log)``, 2D conv kernels; dt_bias as ``ssm_dt.bias``."""
    qk_rows = 2 * cfg.linear_key_head_dim * cfg.linear_num_key_heads
    if hf_name.endswith("norm.weight") and "linear_attn" not in hf_name:
        arr = arr + 1
    elif hf_name.endswith(("in_proj_a.weight", "in_proj_b.weight")):
        arr = _tiled(arr, cfg, per_element=False)
    elif hf_name.endswith(("A_log", "dt_bias")):
        arr = _tiled(arr, cfg, per_element=False)
        if hf_name.endswith("A_log"):
            arr = -np.exp(arr)
        else:
            return arr, hf_name.replace("model.layers.", "blk.").replace(
                "linear_attn.dt_bias", "ssm_dt.bias")
    elif hf_name.endswith("in_proj_z.weight"):
        arr = _tiled(arr, cfg, per_element=True)
    elif hf_name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
        if arr.ndim == 3:
            arr = arr[:, 0]
        arr = np.concatenate([arr[:qk_rows], _tiled(arr[qk_rows:], cfg, per_element=True)])
    elif hf_name.endswith("out_proj.weight"):
        arr = _tiled(arr, cfg, per_element=True, axis=1)
    return arr, hf_name


def _tensors(model, arch: str):
    """``(llama.cpp name, float32 array)`` for every weight of ``model``, as llama.cpp writes."""
    import gguf

    cfg = model.config
    gguf_arch = GGUF_ARCH.get(arch, arch)
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == gguf_arch)
    names = gguf.get_tensor_name_map(enum, _get(cfg, "num_hidden_layers", "n_layer"))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        arr = t.detach().float().numpy().copy()
        if arch.startswith("qwen3_5"):
            arr, hf_name = _qwen35(arr, hf_name, cfg)
            if hf_name.startswith("blk."):
                yield hf_name, arr
                continue
        elif arch == "gpt_oss" and (m := _OSS_EXPERTS.fullmatch(hf_name)):
            yield from _oss_experts(arr, *m.groups())
            continue
        if m := _EXPERTS.fullmatch(hf_name.removesuffix(".weight")):
            bid, which = m.groups()
            if which == "down_proj":  # (experts, d, ff)
                yield f"blk.{bid}.ffn_down_exps.weight", arr
            else:  # (experts, 2 ff, d): gate rows first
                gate, up = np.split(arr, 2, axis=1)
                yield f"blk.{bid}.ffn_gate_exps.weight", np.ascontiguousarray(gate)
                yield f"blk.{bid}.ffn_up_exps.weight", np.ascontiguousarray(up)
            continue
        if m := re.fullmatch(r"model\.layers\.(\d+)\.mlp\.e_score_correction_bias", hf_name):
            yield f"blk.{m[1]}.exp_probs_b.bias", arr  # MiniMax-M2's routing bias
            continue
        if hf_name == "lm_head.weight" and tied and arch not in ("gpt2", "bloom"):
            continue  # llama.cpp writes no output matrix when it is the embedding
        if arch in _PERMUTE_QK and hf_name.endswith("q_proj.weight"):
            arr = _permute(arr, cfg.num_attention_heads)
        elif arch in _PERMUTE_QK and hf_name.endswith("k_proj.weight"):
            arr = _permute(arr, cfg.num_key_value_heads)
        elif arch == "bloom" and "query_key_value" in hf_name:
            arr = _bloom_qkv(arr, cfg.n_head, cfg.hidden_size)
        elif arch == "gpt2" and hf_name.endswith(_GPT2_CONV1D):
            arr = np.ascontiguousarray(arr.T)
        elif arch in _NORM_PLUS_ONE and hf_name.endswith("norm.weight"):
            arr = arr + 1
        elif arch == "mamba" and hf_name.endswith("A_log"):
            arr = -np.exp(arr)
        elif arch in ("mamba", "lfm2") and arr.ndim == 3 and arr.shape[1] == 1:  # conv kernels
            arr = np.ascontiguousarray(arr[:, 0])
        elif hf_name.endswith("shared_expert_gate.weight"):
            arr = arr.reshape(-1)  # llama.cpp: 1D
        if arch == "gpt2" and hf_name == "lm_head.weight":
            yield "output.weight", arr
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None and arch == "bloom":  # llama.cpp drops Bloom's "transformer." prefix
            name = names.get_name(hf_name.removeprefix("transformer."), (".weight", ".bias"))
        if name is None:
            raise KeyError(f"{arch}: no llama.cpp name for {hf_name}")
        yield name, arr


def write_gguf(model, path: Path, name: str | None = None) -> Path:
    """Write ``model`` (one of :func:`tiny_hf`'s, or tiny_llama's) as an F32 GGUF file at
    ``path``, as llama.cpp's converter would."""
    import gguf

    arch = model.config.model_type
    w = gguf.GGUFWriter(str(path), GGUF_ARCH.get(arch, arch))
    # llama.cpp writes Mistral as ``llama``: it loads as a LlamaForCausalLM (transformers' switch
    # to Mistral on general.name == "mistral" fails with gguf 0.19, which has no "mistral" arch)
    w.add_name(name or f"tiny-{arch}")
    _hparams(w, model.config, arch)
    _tokenizer(w, getattr(model.config, "pad_token_id", None))
    for gguf_name, arr in _tensors(model, arch):
        w.add_tensor(gguf_name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
