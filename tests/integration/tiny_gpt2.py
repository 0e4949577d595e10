"""The random-init 2-layer GPT-2 the integration tests train (HF Trainer and Lightning)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

SEQ, D, LAYERS, VOCAB = 16, 32, 2, 64
POINTS = ["embed.resid_post", "blocks.0.resid_post", "blocks.1.resid_post"]
PLANTED = 7  # the neuron given a huge constant in block 0's output


def tiny_gpt2(planted: bool = False) -> GPT2LMHeadModel:
    """Seeded, dropout-free; ``planted``: every token of block 0's output gets +50 on channel
    ``PLANTED``, so Kurt ≈ d there."""
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=LAYERS, n_embd=D, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    if planted:
        with torch.no_grad():
            model.transformer.h[0].mlp.c_proj.bias[PLANTED] = 50.0
    return model
