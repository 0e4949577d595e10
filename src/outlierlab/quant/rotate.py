"""Rotation baseline (QuaRot-style, Ashkboos et al. 2024) for Llama-family HF models.

A function-preserving copy whose residual stream is rotated by an orthogonal Q (d × d), so an
outlier channel is spread over all channels before quantisation:

1. fold every RMSNorm's gain γ into the linears that read its output (W ← W · diag(γ), γ ← 1):
   q/k/v after ``input_layernorm``, gate/up after ``post_attention_layernorm``, the LM head after
   the final norm (a tied head is untied first);
2. rotate: the embedding E ← E · Q; every linear reading the residual stream (q, k, v, gate, up,
   head) W ← W · Q; every linear writing into it (o_proj, down_proj) W ← Qᵀ · W (and b ← Qᵀ b).
   RMSNorm without gain commutes with Q (‖Qx‖ = ‖x‖), so the function is unchanged.

Q is the normalised Sylvester Hadamard matrix when d is a power of two, else (SmolLM2: d = 576)
a seeded random orthogonal matrix (QR of a Gaussian; QuaRot's paper reports random orthogonal
rotations a little behind Hadamard). Not done here, unlike QuaRot: the online Hadamard on the
down-projection input and the rotation of attention values / KV cache; the o_proj and
down_proj inputs therefore keep their outliers.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from outlierlab.errors import ConfigError


def rotation_matrix(d: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal float64 (d, d): normalised Hadamard if d is a power of two, else random."""
    if d & (d - 1) == 0:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < d:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        return h / d**0.5
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))  # a uniform (Haar) draw


def _layers(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    base = getattr(model, "model", None)
    layers = getattr(base, "layers", None)
    ok = layers is not None and all(
        hasattr(b, "input_layernorm") and hasattr(b, "post_attention_layernorm")
        and all(hasattr(getattr(b, "self_attn", None), f"{n}_proj") for n in "qkvo")
        and all(hasattr(getattr(b, "mlp", None), f"{n}_proj") for n in ("gate", "up", "down"))
        for b in layers
    )  # fmt: skip
    if not ok or not hasattr(base, "norm") or getattr(model, "lm_head", None) is None:
        raise ConfigError(
            f"the rotation baseline supports Llama-family HF models (RMSNorm, q/k/v/o and "
            f"gate/up/down projections); {type(model).__name__} is not one"
        )
    for n in [base.norm] + [
        m for b in layers for m in (b.input_layernorm, b.post_attention_layernorm)
    ]:
        if getattr(n, "bias", None) is not None or not hasattr(n, "weight"):
            raise ConfigError(f"the rotation baseline needs RMSNorm; {type(n).__name__} is not")
    return base, list(layers)


def _fold(norm: nn.Module, readers: list[nn.Linear]) -> None:
    g = norm.weight.detach().double()
    for lin in readers:
        lin.weight.data = (lin.weight.double() * g).to(lin.weight.dtype)
    norm.weight.data.fill_(1.0)


def _read(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.data = (lin.weight.double() @ q).to(lin.weight.dtype)


def _write(lin: nn.Linear, q: torch.Tensor) -> None:
    lin.weight.data = (q.T @ lin.weight.double()).to(lin.weight.dtype)
    if lin.bias is not None:
        lin.bias.data = (q.T @ lin.bias.double()).to(lin.bias.dtype)


@torch.no_grad()
def rotate(model: nn.Module, seed: int = 0) -> nn.Module:
    """A rotated, function-preserving deep copy of a Llama-family HF causal LM (module
    docstring); ``model`` is untouched. ConfigError for other architectures."""
    _layers(model)  # validate before copying
    model = copy.deepcopy(model).eval()
    base, layers = _layers(model)
    head = model.lm_head
    if head.weight is base.embed_tokens.weight:  # tied: the head gets its own copy
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    q = rotation_matrix(base.embed_tokens.weight.shape[1], seed).to(base.embed_tokens.weight.device)
    for b in layers:
        a, m = b.self_attn, b.mlp
        _fold(b.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        _fold(b.post_attention_layernorm, [m.gate_proj, m.up_proj])
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _read(lin, q)
        _write(a.o_proj, q)
        _write(m.down_proj, q)
    _fold(base.norm, [head])
    _read(head, q)
    emb = base.embed_tokens.weight
    emb.data = (emb.double() @ q).to(emb.dtype)
    return model
