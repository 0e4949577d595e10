"""A random-init tiny HF Llama (optionally with a planted massive activation) and the same model
written as a GGUF file with the ``gguf`` package's ``GGUFWriter`` (nothing downloaded).

The GGUF holds what llama.cpp's converter writes for a Llama: ``llama.*`` hyper-parameters,
tensors under llama.cpp names with q/k rows permuted to its rotary layout (transformers permutes
them back on load), and a byte-level BPE tokenizer (``tokenizer.ggml.model = gpt2``) of the 256
byte symbols plus one merge and ``<eos>``; :mod:`tiny_gguf` writes it, as it writes the other
architectures.
"""

from __future__ import annotations

from pathlib import Path

import torch

SEQ, D, LAYERS, HEADS, KV_HEADS, MLP = 64, 32, 3, 4, 2, 64
PLANT_LAYER, PLANT_CHANNEL, PLANT_VALUE = 1, 5, 400.0
VOCAB, EOS = 258, 257  # 256 bytes, one merge ("  "), <eos>


def tiny_llama(planted: bool = False, seed: int = 0):
    """Seeded tiny ``LlamaForCausalLM`` (vocab 258: bytes, one merge, eos). ``planted``: the down
    projection of block ``PLANT_LAYER`` writes ``PLANT_VALUE`` × its first hidden unit into
    residual channel ``PLANT_CHANNEL`` via a large weight, so the block output carries a massive
    activation on some tokens (Sun et al. 2024 style)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=MLP, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=SEQ,
        rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
        bos_token_id=EOS, eos_token_id=EOS,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    if planted:
        with torch.no_grad():
            model.model.layers[PLANT_LAYER].mlp.down_proj.weight[PLANT_CHANNEL] *= PLANT_VALUE
    return model


def plant_massive(model, unit: int = 0, gain: float = 3.0):
    """A Sun et al.-style massive activation on the windows' first token, in place: residual
    channel ``PLANT_CHANNEL`` is 1 in the embedding of ``EOS`` (the windows' first token in the
    tests) and 0 in every other token's; MLP unit ``unit`` of block ``PLANT_LAYER`` reads only
    that channel (gate and up weights ``gain``), so its input to ``down_proj`` is ≈ (gain·√d)²
    on token 0 and ≈ 0 elsewhere, and block ``PLANT_LAYER`` writes a large vector into the
    residual stream of token 0 only."""
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb[:, PLANT_CHANNEL] = 0.0
        emb[EOS, PLANT_CHANNEL] = 1.0
        mlp = model.model.layers[PLANT_LAYER].mlp
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[unit] = 0.0
            lin.weight[unit, PLANT_CHANNEL] = gain
    return model


def write_gguf(model, path: Path) -> Path:
    """Write ``model`` (a :func:`tiny_llama`) as an F32 GGUF file at ``path`` (tiny_gguf's writer,
    which handles every architecture transformers' GGUF loader reads)."""
    from tiny_gguf import write_gguf as write

    return write(model, path)
