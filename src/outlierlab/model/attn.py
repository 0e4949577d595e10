"""Causal attention with the probability functions published to train without outlier
features (docs/mitigations.md, science.md §9), as a drop-in for
``F.scaled_dot_product_attention(q, k, v, is_causal=True)``.

``kind`` picks how logits ``z`` (one causal row, masked keys left out) become weights ``p``:

- ``softmax``: p_i = exp(z_i) / Σ_j exp(z_j) (SDPA itself when nothing else is asked for).
- ``softmax1`` (softmax-plus-one; Miller 2023, OrthoAdam, Kaul et al. ICLR 2025):
  p_i = exp(z_i) / (1 + Σ_j exp(z_j)); a head may attend to nothing.
- ``softpick`` (Zuhri et al. 2025, arXiv 2504.20966): p_i = relu(e^{z_i} − 1) / Σ_j |e^{z_j} − 1|,
  computed after subtracting the row max m as relu(e^{z_i−m} − e^{−m}) / Σ_j |e^{z_j−m} − e^{−m}|
  (the authors' stable form; where they add ε = 1e-8 to the sum, the sum is clamped at the
  smallest normal number instead, so a row of zeros gives zeros and any other row is exact);
  masked keys count 0 in the sum (|e^{−∞} − 1| would count 1).
- ``clipped`` (Bondarenko et al. 2023, arXiv 2306.12929): p = clip((ζ − γ)·softmax(z) + γ, 0, 1),
  ζ ≥ 1, γ ≤ 0 (defaults ζ = 1, γ = −0.03, as ``GPTConfig``); masked keys stay 0.

An attention bias (Sun et al. 2024, arXiv 2402.17762): ``k_bias``, ``v_bias`` (…, heads, n, d_head)
are n extra keys and values prepended to every sequence, visible to every query, not rotated.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

KINDS = ("softmax", "softmax1", "softpick", "clipped")


def causal_mask(t_q: int, t_k: int, n_bias: int = 0, device: torch.device | None = None):
    """Bool (t_q, n_bias + t_k), True where query i may see the key: the ``n_bias`` prepended
    bias slots always, token j when j ≤ i + (t_k − t_q) (SDPA's ``is_causal`` for t_q = t_k).
    Built once per shape and device and shared: read it, never write into it."""
    return _causal(t_q, t_k, n_bias, torch.device(device or "cpu"), torch.float32)[0]


@functools.lru_cache(maxsize=64)
def _causal(t_q: int, t_k: int, n_bias: int, device: torch.device, dtype: torch.dtype,
            fill: float = -math.inf) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The causal mask and its additive form (0 where visible, ``fill`` where not, ``dtype``):
    the weights of every evaluation, and the monitor's attention entropy on every measured
    step, add it instead of building a mask and filling with it each call."""
    seen = torch.ones(t_q, t_k, dtype=torch.bool, device=device).tril(t_k - t_q)
    if n_bias:
        seen = torch.cat([torch.ones(t_q, n_bias, dtype=torch.bool, device=device), seen], -1)
    blocked = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill(~seen, fill)
    return seen, blocked


def causal_bias(t_q: int, t_k: int, device: torch.device | str | None = None,
                dtype: torch.dtype = torch.float32, finite: bool = False) -> torch.Tensor:
    """The causal mask in additive form (t_q, t_k): 0 where query i may see key j, −∞ where
    not (``finite``: the dtype's most negative number, whose softmax weight is exactly 0 as
    well, so that p·z stays 0 there); ``softmax(z + causal_bias)`` is :func:`attention_probs`
    of z. Cached and shared: read it, never write into it."""
    fill = torch.finfo(dtype).min if finite else -math.inf
    return _causal(t_q, t_k, 0, torch.device(device or "cpu"), dtype, fill)[1]


def attention_probs(
    logits: torch.Tensor,
    kind: str = "softmax",
    mask: torch.Tensor | None = None,
    *,
    zeta: float = 1.0,
    gamma: float = -0.03,
    n_bias: int = 0,
) -> torch.Tensor:
    """Attention weights (…, T_q, T_k) of ``kind`` (module docstring) from ``logits`` (already
    scaled and soft-capped); ``mask`` (bool, True = visible; default causal, after ``n_bias``
    always-visible bias slots) entries are exactly 0. bf16/fp16 logits are computed in float32;
    float32 and float64 stay as they are."""
    return _probs(logits, kind, mask, n_bias, zeta, gamma)


def _probs(logits: torch.Tensor, kind: str, mask: torch.Tensor | None, n_bias: int,
           zeta: float, gamma: float) -> torch.Tensor:  # fmt: skip
    """:func:`attention_probs`; with ``mask`` None the causal mask with ``n_bias`` bias slots,
    added in its cached −∞ form (z = logits + 0 or −∞: the same z as filling with the mask)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    if mask is None:
        t_q, t_k = logits.shape[-2], logits.shape[-1] - n_bias
        mask, blocked = _causal(t_q, t_k, n_bias, logits.device, logits.dtype)
        z = logits + blocked
    else:
        z = logits.masked_fill(~mask, float("-inf"))
    if kind == "softmax":
        return z.softmax(dim=-1)
    if kind == "clipped":
        p = ((zeta - gamma) * z.softmax(dim=-1) + gamma).clamp(0.0, 1.0)
        return p.masked_fill(~mask, 0.0)  # γ > 0 would otherwise leak to future keys
    m = z.amax(dim=-1, keepdim=True)
    if kind == "softmax1":
        m = m.clamp(min=0.0)  # max(z, 0): the implicit extra logit 0
        e = torch.exp(z - m)
        return e / (torch.exp(-m) + e.sum(dim=-1, keepdim=True))
    if kind == "softpick":
        e = torch.exp(z - m) - torch.exp(-m)  # (e^z − 1)·e^{−m}
        den = torch.where(mask, e.abs(), 0.0).sum(dim=-1, keepdim=True)
        return F.relu(e) / den.clamp(min=torch.finfo(den.dtype).tiny)
    raise ValueError(f"unknown attention kind {kind!r}; allowed: {', '.join(KINDS)}")


def attention_weights(
    q: torch.Tensor,
    k: torch.Tensor,
    kind: str = "softmax",
    *,
    k_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    zeta: float = 1.0,
    gamma: float = -0.03,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal weights (…, heads, T_q, n_bias + T_k) used by :func:`attention`: logits
    q·kᵀ/√d_head (or ·``scale``), soft-cap c·tanh(z/c), then :func:`attention_probs`. The first
    n_bias columns are the bias slots (``k_bias``)."""
    n_bias = 0
    if k_bias is not None:
        n_bias = k_bias.shape[-2]
        k = torch.cat([k_bias.expand(*k.shape[:-2], n_bias, k.shape[-1]).to(k.dtype), k], -2)
    att = q @ k.transpose(-2, -1)
    att = att / math.sqrt(q.shape[-1]) if scale is None else att * scale
    if softcap is not None:
        att = softcap * torch.tanh(att / softcap)
    return _probs(att, kind, None, n_bias, zeta, gamma)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str = "softmax",
    *,
    k_bias: torch.Tensor | None = None,
    v_bias: torch.Tensor | None = None,
    softcap: float | None = None,
    zeta: float = 1.0,
    gamma: float = -0.03,
    dropout_p: float = 0.0,
    scale: float | None = None,
) -> torch.Tensor:
    """Causal attention (…, heads, T, d_head) → (…, heads, T, d_head) with weights of ``kind``
    (module docstring). ``kind="softmax"`` with no soft-cap and no bias is
    ``F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)``
    itself; with a bias it is SDPA with an explicit mask; anything else writes the weights out.
    ``k_bias``/``v_bias``: (…, heads, n, d_head) prepended keys/values (Sun et al. 2024).
    ``dropout_p`` drops weights (pass 0 in eval)."""
    if kind not in KINDS:
        raise ValueError(f"unknown attention kind {kind!r}; allowed: {', '.join(KINDS)}")
    if (k_bias is None) != (v_bias is None):
        raise ValueError("k_bias and v_bias go together")
    if kind == "softmax" and softcap is None:
        if k_bias is None:
            return F.scaled_dot_product_attention(
                q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale
            )
        n = k_bias.shape[-2]
        kk = torch.cat([k_bias.expand(*k.shape[:-2], n, k.shape[-1]).to(k.dtype), k], -2)
        vv = torch.cat([v_bias.expand(*v.shape[:-2], n, v.shape[-1]).to(v.dtype), v], -2)
        mask = causal_mask(q.shape[-2], k.shape[-2], n, device=q.device)
        return F.scaled_dot_product_attention(
            q, kk, vv, attn_mask=mask, dropout_p=dropout_p, scale=scale
        )
    p = attention_weights(
        q, k, kind, k_bias=k_bias, softcap=softcap, zeta=zeta, gamma=gamma, scale=scale
    )
    if dropout_p > 0:
        p = F.dropout(p, dropout_p)
    p = p.to(v.dtype)
    if k_bias is None:
        return p @ v
    n = k_bias.shape[-2]
    return p[..., n:] @ v + p[..., :n] @ v_bias.to(v.dtype)
