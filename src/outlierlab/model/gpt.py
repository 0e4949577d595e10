"""A nanoGPT-style decoder whose block is every architecture of science §2.

Module names are stable and are what the monitor measures (ARCHITECTURE.md):
``tok_emb``, ``pos_emb``, ``drop``, ``embed_out`` (point ``embed.resid_post``),
``blocks.{i}`` (point ``blocks.{i}.resid_post``) with ``attn_norm``, ``attn`` (``q_norm``,
``k_norm``, ``gate``, ``k_bias``, ``v_bias``), ``mlp_norm``, ``mlp``; then ``final_norm`` and
``lm_head`` (with ``model.embed_proj``: ``embed_proj`` before ``embed_out`` and
``unembed_proj`` before ``lm_head``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from outlierlab import safe_io
from outlierlab.errors import ConfigError, ModelLoadError
from outlierlab.model.attn import attention, attention_probs, attention_weights
from outlierlab.model.config import GPTConfig
from outlierlab.run_folder import MODEL_CONFIG_FILE, MODEL_FILE

FORMAT = "outlierlab.gpt"
LN_EPS = 1e-5
RMS_EPS = 1e-6
PROBS_CHUNK = 1 << 24  # float32 elements of attention probabilities handed to a sink at once

# -- norms --------------------------------------------------------------------------------------


class SRMSNorm(nn.RMSNorm):
    """Simple RMSNorm (science §2): x / rms(x), no trainable weights."""

    def __init__(self, dim: int, eps: float = RMS_EPS) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=False)


class SSNorm(nn.RMSNorm):
    """Single-scale RMSNorm (OSP, Park et al. 2025, arXiv 2506.19697): γ · x / rms(x) with one
    trainable scalar γ (init 1) instead of RMSNorm's per-channel gain; SRMSNorm is γ ≡ 1."""

    def __init__(self, dim: int, eps: float = RMS_EPS) -> None:
        super().__init__(dim, eps=eps, elementwise_affine=False)
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.gain


def make_norm(kind: str, dim: int, affine: bool = True, bias: bool = False) -> nn.Module:
    """The norm ``kind`` of width ``dim``; ``"none"`` gives ``nn.Identity`` (no parameters)."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=LN_EPS, elementwise_affine=affine, bias=affine and bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=RMS_EPS, elementwise_affine=affine)
    if kind == "srmsnorm":
        return SRMSNorm(dim)
    if kind == "ssnorm":
        return SSNorm(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}")


NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)  # SRMSNorm and SSNorm are nn.RMSNorms

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}

# -- rotary position encoding -------------------------------------------------------------------


class Rotary(nn.Module):
    """RoPE (Su et al. 2021), GPT-NeoX layout: pairs (x_i, x_{i+hs/2}) rotate by angle
    t·base^(-2i/hs) at position t, so q_s·k_t depends on s − t only."""

    def __init__(self, d_head: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = base ** (-torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, nh, T, hs)
        t = torch.arange(x.size(-2), device=x.device, dtype=torch.float32)
        angles = torch.outer(t, self.inv_freq.float())  # (T, hs/2), float32 under bf16
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        x1, x2 = x[..., : x.size(-1) // 2], x[..., x.size(-1) // 2 :]
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


# -- the sublayers ------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with optional QK-Norm and tanh soft-cap (science §2), and
    the published mitigations of docs/mitigations.md (``model.attn``, ``attn_gate``,
    ``attn_bias_kv``; weights computed by :mod:`outlierlab.model.attn`).

    QK-Norm: q̂ = g_q ⊙ q / rms(q) and k̂ = g_k ⊙ k / rms(k) per head (gains of size d_head,
    shared across heads), so |q̂·k̂| / √d_head ≤ √d_head · max|g_q| · max|g_k|.
    Soft-cap c: logits ← c · tanh(logits / c), so |logits| < c.
    Gate (Qiu et al. 2025): y_h ← y_h ⊙ σ(x W_g) per head (``head``) or element (``elem``).
    Attention bias (Sun et al. 2024): ``k_bias``, ``v_bias`` (heads, 1, d_head) prepended.

    ``probs_sink``: None except while a monitor measures a forward (``OutlierMonitor`` with
    ``attn_entropy``); then ``probs_sink.rows(batch, seq_len, device)`` says which sequences
    it wants (a LongTensor, or None for all) and ``probs_sink(probs)`` is called with their
    causal attention probabilities (B, heads, T, T), recomputed in float32 from the same q and k
    without grad, a few sequences at a time, with the ``model.attn`` function actually used
    (plain softmax, to a sink with a ``causal_logits`` method: ``probs_sink.causal_logits(z)``
    instead, z the float32 logits after scale and soft-cap, before the causal mask, the sink's
    to overwrite: softmax over each row's first i + 1 keys gives the probabilities);
    with ``attn_bias_kv`` the weight on the bias slot is left out (rows then sum to < 1, as
    with ``softmax1``, ``softpick`` and ``clipped``). SDPA never returns them, so this is the
    only cost, and only on measured forwards.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.d_head = cfg.n_head, cfg.d_head
        self.softcap = cfg.logit_softcap
        self.dropout = cfg.dropout
        self.kind = cfg.attn
        self.clip = {"zeta": cfg.clip_zeta, "gamma": cfg.clip_gamma}
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(cfg.d_head, eps=RMS_EPS)
            self.k_norm = nn.RMSNorm(cfg.d_head, eps=RMS_EPS)
        else:
            self.q_norm = self.k_norm = None
        self.rotary = Rotary(cfg.d_head) if cfg.pos_encoding == "rotary" else None
        gate_width = {"none": 0, "head": cfg.n_head, "elem": cfg.d_model}[cfg.attn_gate]
        self.gate = nn.Linear(cfg.d_model, gate_width, bias=False) if gate_width else None
        if cfg.attn_bias_kv:
            self.k_bias = nn.Parameter(torch.zeros(cfg.n_head, 1, cfg.d_head))
            self.v_bias = nn.Parameter(torch.zeros(cfg.n_head, 1, cfg.d_head))
        else:
            self.k_bias = self.v_bias = None
        self.probs_sink: Any = None
        self.sites: Any = None  # quantisation sites of the internals (quant.paper), else None

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._heads(*self.qkv(x).split(x.shape[-1], dim=2))

    def _heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, T, C) q, k, v → (B, nh, T, hs) each, QK-Norm and RoPE applied to q and k."""
        B, T, _ = q.shape
        q = q.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, self.d_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q), self.rotary(k)
        return q, k, v

    def _logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q kᵀ / √d_head (B, nh, T, T_k), soft-capped."""
        att = (q * (1 / math.sqrt(self.d_head))) @ k.transpose(-2, -1)
        if self.softcap is not None:
            att = self.softcap * torch.tanh(att / self.softcap)
        return att

    def _k_bias(self) -> torch.Tensor | None:
        """The bias key through the same QK-Norm as token keys (so OP's logit bound holds)."""
        if self.k_bias is None:
            return None
        return self.k_norm(self.k_bias) if self.k_norm is not None else self.k_bias

    def attention_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-softmax logits (B, nh, T, T) after scaling and soft-cap, before the causal mask
        (token keys only, without an ``attn_bias_kv`` slot)."""
        q, k, _ = self._qkv(x)
        return self._logits(q, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sites is not None:
            return self._forward_sites(x, self.sites)
        B, T, C = x.shape
        q, k, v = self._qkv(x)
        if self.probs_sink is not None:
            self._report_probs(self.probs_sink, q, k)
        p = self.dropout if self.training else 0.0
        y = attention(  # SDPA itself for plain softmax; the soft-cap etc. write the weights out
            q, k, v, self.kind, k_bias=self._k_bias(), v_bias=self.v_bias, softcap=self.softcap,
            dropout_p=p, **self.clip,
        )  # fmt: skip
        y = y.transpose(1, 2)  # (B, T, nh, hs)
        if self.gate is not None:  # σ(x W_g): (B, T, nh) per head or (B, T, d) per element
            g = torch.sigmoid(self.gate(x)).view(B, T, self.n_head, -1)
            y = y * g.to(y.dtype)
        y = y.contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))

    def _forward_sites(self, x: torch.Tensor, s: Any) -> torch.Tensor:
        """The forward with every attention internal written out and passed through ``s``
        (quantisation sites, :mod:`outlierlab.quant.paper`): ``s.q``, ``s.k``, ``s.v`` on the
        projections (B, T, C), ``s.scores`` on q·kᵀ/√d_head (before soft-cap and mask),
        ``s.probs`` on the weights, ``s.context`` on P·V (B, T, C, before the gate). Dropout
        and the probability sink are left out (evaluation only)."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = self._heads(s.q(q), s.k(k), s.v(v))
        kb = self._k_bias()
        n = 0 if kb is None else kb.shape[-2]
        kk = k if kb is None else torch.cat([kb.expand(B, -1, -1, -1).to(k.dtype), k], -2)
        att = s.scores((q @ kk.transpose(-2, -1)) / math.sqrt(self.d_head))
        if self.softcap is not None:
            att = self.softcap * torch.tanh(att / self.softcap)
        p = s.probs(attention_probs(att, self.kind, n_bias=n, **self.clip)).to(v.dtype)
        y = p[..., n:] @ v
        if n:
            y = y + p[..., :n] @ self.v_bias.to(v.dtype)
        y = s.context(y.transpose(1, 2).reshape(B, T, C)).view(B, T, self.n_head, self.d_head)
        if self.gate is not None:
            y = y * torch.sigmoid(self.gate(x)).view(B, T, self.n_head, -1).to(y.dtype)
        return self.proj(y.reshape(B, T, C))

    @torch.compiler.disable  # host-side work, also inside a compiled block (structure._eager)
    def _report_probs(self, sink: Any, q: torch.Tensor, k: torch.Tensor) -> None:
        """Hand ``sink`` the causal attention probabilities (float32, no grad, no autocast,
        before dropout, as the authors' ``attentions``) of the sequences it asks for, at most
        ``PROBS_CHUNK`` elements at a time."""
        with torch.no_grad(), torch.autocast(q.device.type, enabled=False):
            idx = sink.rows(q.shape[0], q.shape[2], q.device)
            if idx is not None and idx.device.type == "cpu" and idx.numel() == 1:
                i = int(idx)  # one sequence (CPU: no sync): a view, no copy
                q, k = q[i : i + 1], k[i : i + 1]
            elif idx is not None:
                q, k = q.index_select(0, idx), k.index_select(0, idx)
            step = max(1, PROBS_CHUNK // (q.shape[1] * q.shape[2] * k.shape[2]))
            kb = self._k_bias()
            kb = kb.float() if kb is not None else None
            n = 0 if kb is None else kb.shape[-2]
            plain = self.kind == "softmax" and kb is None and hasattr(sink, "causal_logits")
            one = q.shape[0] <= step
            for qc, kc in zip((q,) if one else q.split(step), (k,) if one else k.split(step)):
                if plain:  # the sink takes the logits: no probabilities written out here
                    sink.causal_logits(self._logits(qc.float(), kc.float()))
                    continue
                probs = attention_weights(
                    qc.float(), kc.float(), self.kind, k_bias=kb, softcap=self.softcap, **self.clip
                )
                sink(probs[..., n:] if n else probs)


class MLP(nn.Module):
    """d → d_mlp → activation → d."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_width, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]()
        self.proj = nn.Linear(cfg.mlp_width, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))


class Block(nn.Module):
    """One block, three architectures (science §2), β the residual-branch gain:

    - ``pre``:  h = x + β·Attn(N₁(x));   out = h + β·MLP(N₂(h))
    - ``post``: h = N₁(x + β·Attn(x));   out = N₂(h + β·MLP(h))
    - ``op``:   h = x + β·Attn(N₁(x));   out = h + β·MLP(h), N₁ = identity except in the first
      block when ``first_attn_norm``.
    """

    def __init__(self, cfg: GPTConfig, index: int) -> None:
        super().__init__()
        self.kind = cfg.block
        d, aff, bias = cfg.d_model, cfg.norm_affine, cfg.bias
        if cfg.block in ("pre", "post"):
            self.attn_norm = make_norm(cfg.norm, d, aff, bias)
            self.mlp_norm = make_norm(cfg.norm, d, aff, bias)
        else:
            first = index == 0 and cfg.first_attn_norm
            self.attn_norm = make_norm(cfg.norm if first else "none", d, aff, bias)
            self.mlp_norm = nn.Identity()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)
        if cfg.beta_trainable:
            self.beta_attn = nn.Parameter(torch.tensor(cfg.beta_value))
            self.beta_mlp = nn.Parameter(torch.tensor(cfg.beta_value))
        else:
            self.beta_attn = self.beta_mlp = cfg.beta_value
        self.sites: Any = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d) -> (B, T, d)
        s = self.sites  # quantisation of the two residual sums (quant.paper), else None
        if self.kind == "post":
            h = x + _gain(self.beta_attn, self.attn(x))
            h = self.attn_norm(h if s is None else s.attn_sum(h))
            out = h + _gain(self.beta_mlp, self.mlp(h))
            return self.mlp_norm(out if s is None else s.mlp_sum(out))
        h = x + _gain(self.beta_attn, self.attn(self.attn_norm(x)))
        h = h if s is None else s.attn_sum(h)
        out = h + _gain(self.beta_mlp, self.mlp(self.mlp_norm(h)))
        return out if s is None else s.mlp_sum(out)

    def extra_repr(self) -> str:
        beta = self.beta_attn
        return f"kind={self.kind!r}" + ("" if isinstance(beta, nn.Parameter) else f", beta={beta}")


def _gain(beta: float | nn.Parameter, y: torch.Tensor) -> torch.Tensor:
    """β·y, skipping the multiply (forward and backward) when β is a fixed 1.0."""
    return y if isinstance(beta, float) and beta == 1.0 else beta * y


# -- the model ----------------------------------------------------------------------------------


class GPT(nn.Module):
    """Decoder-only language model: embeddings → blocks → final norm → (tied) unembedding."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.config = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = (
            nn.Embedding(cfg.seq_len, cfg.d_model) if cfg.pos_encoding == "learned" else None
        )
        self.drop = nn.Dropout(cfg.dropout)
        # OSP's EmbProj (rot1, rot2): d × d after the embeddings and before the unembedding
        self.embed_proj = (
            nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.embed_proj else None
        )
        self.embed_out = nn.Identity()  # measurement point `embed.resid_post`
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.final_norm = (
            make_norm(cfg.norm, cfg.d_model, cfg.norm_affine, cfg.bias)
            if cfg.final_norm
            else nn.Identity()
        )
        self.unembed_proj = (
            nn.Linear(cfg.d_model, cfg.d_model, bias=False) if cfg.embed_proj else None
        )
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.apply(self._init_weights)
        for proj in (self.embed_proj, self.unembed_proj):
            if proj is not None:
                nn.init.orthogonal_(proj.weight)  # as OSP: a rotation at init
        for block in self.blocks:
            for bias_kv in (block.attn.k_bias, block.attn.v_bias):
                if bias_kv is not None:
                    nn.init.normal_(bias_kv, mean=0.0, std=cfg.init_std)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _init_weights(self, module: nn.Module) -> None:
        """science §2: every weight matrix and embedding N(0, init_std²); biases zero."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=self.config.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``idx`` (B, T) int64 → logits (B, T, vocab); with ``targets`` (B, T) also the mean
        cross-entropy loss (positions with target -100 are ignored)."""
        T = idx.size(1)
        if self.pos_emb is not None and idx.size(1) > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds model.seq_len={self.config.seq_len}")
        x = self.tok_emb(idx)  # (B, T, d)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=idx.device))  # (T, d) broadcast
        if self.embed_proj is not None:
            x = self.embed_proj(x)
        x = self.embed_out(self.drop(x))
        for block in self.blocks:
            x = block(x)
        x = self.final_norm(x)
        if self.unembed_proj is not None:
            x = self.unembed_proj(x)
        logits = self.lm_head(x)  # (B, T, vocab)
        if targets is None:
            return logits
        loss = F.cross_entropy(
            logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100
        )
        return logits, loss

    # -- measurement ---------------------------------------------------------------------------

    def residual_points(self) -> dict[str, nn.Module]:
        """science §1 "Where": the residual stream after the embeddings (positions and dropout
        included) and after each block (before the final norm), in model order."""
        points: dict[str, nn.Module] = OrderedDict([("embed.resid_post", self.embed_out)])
        for i, block in enumerate(self.blocks):
            points[f"blocks.{i}.resid_post"] = block
        return points

    def attention_points(self) -> dict[str, nn.Module]:
        """The attention modules (``blocks.{i}.attn``), in model order; each has a
        ``probs_sink`` a monitor may set to read its attention probabilities (attention
        entropy)."""
        return OrderedDict((f"blocks.{i}.attn", b.attn) for i, b in enumerate(self.blocks))

    # -- accounting ----------------------------------------------------------------------------

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, each shared tensor counted once. ``non_embedding`` (nanoGPT's
        convention) leaves out the position table and, when untied, the input token table: what
        remains is every parameter used in a matmul (the tied table counts as the lm head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
            if not self.config.tie_embeddings:
                n -= self.tok_emb.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, forward + backward: 6·N + 12·L·d·T with N the
        non-embedding parameters and T the context (PaLM appendix B, nanoGPT's MFU)."""
        c = self.config
        T = seq_len if seq_len is not None else c.seq_len
        return 6 * self.num_params(non_embedding=True) + 12 * c.n_layer * c.d_model * T

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """Two optimizer groups: weight decay on the ≥2-D matmul weights only; none on norms,
        biases (attention-bias keys and values too), QK gains, β and embeddings (the tied lm
        head is the token embedding)."""
        embeddings = {id(self.tok_emb.weight)}
        if self.pos_emb is not None:
            embeddings.add(id(self.pos_emb.weight))
        for block in self.blocks:
            if block.attn.k_bias is not None:
                embeddings |= {id(block.attn.k_bias), id(block.attn.v_bias)}
        decay, no_decay = [], []
        for p in self.parameters():  # shared tensors appear once
            if p.dim() >= 2 and id(p) not in embeddings:
                decay.append(p)
            else:
                no_decay.append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # -- save / load ---------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``model_config.json`` (``{"format", "config",
        "weights_sha256"}``) into ``directory``, each atomically (temp file + os.replace)."""
        from safetensors.torch import save_model

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        with safe_io.replacing(out / MODEL_FILE) as tmp:  # a stale link there is removed
            save_model(self, str(tmp), metadata={"format": "pt"})
            digest = _sha256(tmp)
        meta = {"format": FORMAT, "config": self.config.to_dict(), "weights_sha256": digest}
        safe_io.write_text(out / MODEL_CONFIG_FILE, json.dumps(meta, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> GPT:
        """Load a folder written by :meth:`save`; in eval mode. Raises ``ModelLoadError`` (one
        line) on a missing file, a checksum mismatch, a corrupt file, missing or unexpected
        tensors, or wrong shapes; names and shapes are checked against the weights' header
        before the model is built, so nothing larger than the file is allocated."""
        from safetensors.torch import load_model

        folder = Path(directory)
        cfg_path, weights = folder / MODEL_CONFIG_FILE, folder / MODEL_FILE
        for path in (cfg_path, weights):
            if not path.is_file():
                raise ModelLoadError(
                    f"{path}: missing; a saved GPT folder has {MODEL_CONFIG_FILE} and {MODEL_FILE}"
                )
        try:
            meta = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{cfg_path}: not valid JSON ({_one_line(exc)})") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or "config" not in meta:
            raise ModelLoadError(f"{cfg_path}: not an outlierlab GPT config (format {FORMAT!r})")
        try:
            cfg = GPTConfig.from_dict(meta["config"])
        except ConfigError as exc:
            raise ModelLoadError(f"{cfg_path}: {exc}") from exc
        expected = meta.get("weights_sha256")
        with safe_io.pinned(weights) as name:  # the file as it is now, whatever its name
            if expected is not None and _sha256(name) != expected:
                raise ModelLoadError(f"{weights}: checksum does not match {MODEL_CONFIG_FILE} "
                                     "(tampered?)")
            _check_header(weights, cfg, name)  # before allocating what the config asks for
            model = cls(cfg)
            try:  # names and shapes already match: strict only guards the invariant
                load_model(model, name, strict=True, device=str(map_location))
            except Exception as exc:  # safetensors raises several types for corrupt files
                raise ModelLoadError(f"{weights}: cannot load ({_one_line(exc)})") from exc
        return model.to(map_location).eval()


def _check_header(weights: Path, cfg: GPTConfig, name: str | None = None) -> None:
    """Compare the tensor names and shapes in the safetensors header of ``weights`` with those
    ``cfg`` builds (on the meta device: no memory), so a tampered config cannot make
    :meth:`GPT.load` allocate more than the file holds. ``ModelLoadError`` names the first
    mismatching tensor."""
    from safetensors import safe_open

    try:
        with safe_open(name or str(weights), framework="pt") as f:
            header = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    except Exception as exc:  # safetensors raises several types for corrupt files
        raise ModelLoadError(f"{weights}: cannot load ({_one_line(exc)})") from exc
    layers = {k.split(".")[1] for k in header if k.startswith("blocks.")}
    if len(layers) != cfg.n_layer:  # before building anything the size of the config
        raise ModelLoadError(f"{weights}: the file has {len(layers)} blocks, "
                             f"{MODEL_CONFIG_FILE} asks for n_layer={cfg.n_layer}")
    with torch.device("meta"):
        wanted = GPT(cfg).state_dict(keep_vars=True)  # tied weights: one object, several names
    for name, t in wanted.items():
        if name in header and header[name] != tuple(t.shape):
            raise ModelLoadError(
                f"{weights}: size mismatch for tensor {name}: the file has {list(header[name])}, "
                f"{MODEL_CONFIG_FILE} asks for {list(t.shape)}"
            )
    present = {id(t) for name, t in wanted.items() if name in header}
    missing = sorted(n for n, t in wanted.items() if id(t) not in present)
    unexpected = sorted(set(header) - set(wanted))
    if missing or unexpected:
        raise ModelLoadError(
            f"{weights}: tensors do not match the config; missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:300] + ("…" if len(text) > 300 else "")
