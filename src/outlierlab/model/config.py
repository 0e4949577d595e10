"""``GPTConfig``: the validated model config and the named presets of science §2.

Every architecture the paper compares is one config of the same GPT; presets are plain
dictionaries of field overrides, so a preset printed with :meth:`GPTConfig.to_dict` *is* the
config. Derived values (``mlp_width``, ``beta_value``, ``d_head``) are properties; the stored
fields keep what the user wrote (``d_mlp=None``, ``beta="auto"``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from outlierlab.errors import ConfigError
from outlierlab.fields import RESUMABLE, bad, choice, flag, number, setting

BLOCKS = ("pre", "post", "op")
NORMS = ("layernorm", "rmsnorm", "srmsnorm", "ssnorm", "none")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")
POS_ENCODINGS = ("learned", "rotary")
ATTENTIONS = ("softmax", "softmax1", "softpick", "clipped")  # model/attn.py
ATTN_GATES = ("none", "head", "elem")

# science §2. Each preset overrides the defaults below (the defaults are `pre-ln`). No preset
# sets the activation: every block uses the default (ReLU), so presets differ in the block only.
PRESETS: dict[str, dict[str, Any]] = {
    "pre-ln": {},
    # the block output is already normalised, so no final norm (original Transformer / BERT).
    "post-ln": {"block": "post", "final_norm": False},
    "pre-rms": {"norm": "rmsnorm"},
    "pre-srms": {"norm": "srmsnorm", "norm_affine": False},
    # as the authors ran it (simplified_transformers, config/model/op.yaml).
    "op": {
        "block": "op",
        "norm": "layernorm",
        "first_attn_norm": True,
        "final_norm": True,
        "qk_norm": True,
        "beta": 0.2,
    },
    # the paper's 1.2B runs: a final LN worsens OFs and signal propagation.
    "op-nofinal": {
        "block": "op",
        "norm": "layernorm",
        "first_attn_norm": True,
        "final_norm": False,
        "qk_norm": True,
        "beta": 0.2,
    },
}


MAX_SIZE = {"vocab_size": 2**24, "n_layer": 1024, "d_model": 2**17, "n_head": 2**12,
            "seq_len": 2**22}
"""Caps on a GPT's sizes: beyond them a config (or a tampered model_config.json) is refused at
once instead of hanging in allocation."""


@dataclass
class GPTConfig:
    """A decoder-only GPT whose block switches between the architectures of science §2.

    The defaults are the ``pre-ln`` preset at a CPU-friendly size (6 × 192, byte vocabulary).
    """

    vocab_size: int = 260
    """Token vocabulary size (256 bytes + specials by default; set it from the tokenizer)."""
    n_layer: int = 6
    """Number of blocks L."""
    d_model: int = 192
    """Residual-stream width d."""
    n_head: int = 6
    """Attention heads; ``d_model`` must be divisible by it (d_head = d_model / n_head)."""
    d_mlp: int | None = None
    """MLP hidden width; ``None`` means 4 · d_model."""
    seq_len: int = 128
    """Maximum context length T (size of the learned position table)."""
    block: str = "pre"
    """``pre``: x + β·Attn(Norm(x)); ``post``: Norm(x + β·Attn(x)); ``op``: x + β·Attn(x),
    no norms in the block (science §2). The MLP half follows the same pattern."""
    norm: str = "layernorm"
    """Norm for pre/post blocks, the first-block attention-input norm and the final norm:
    ``layernorm``, ``rmsnorm``, ``srmsnorm`` (RMS normalisation, no weights), ``ssnorm``
    (single-scale RMSNorm, OSP: γ·x/rms(x) with one trainable scalar γ) or ``none``."""
    norm_affine: bool = True
    """Trainable gain (and bias if ``bias``) in layernorm/rmsnorm; srmsnorm never has one,
    ssnorm always has its one scalar."""
    qk_norm: bool = False
    """RMSNorm each head's queries and keys before the dot product (gain of size d_head shared
    across heads): entropy regulation of science §2."""
    logit_softcap: float | None = None
    """Attention-logit tanh soft-cap c: logits ← c·tanh(logits/c) (science §2 uses 30)."""
    beta: float | str = 1.0
    """Residual-branch gain β: a positive number or ``"auto"`` = 1/√(2·n_layer)
    (0.20 at 12 layers, 0.17 at 18, the authors' 0.2; O(1/√depth), science §2)."""
    beta_trainable: bool = False
    """Make each block's two β scalars trainable parameters (never weight-decayed)."""
    first_attn_norm: bool = False
    """``op`` only: a norm on the first block's attention input (the authors' code)."""
    final_norm: bool = True
    """A norm on the residual stream before the unembedding."""
    activation: str = "relu"
    """MLP non-linearity: relu, gelu, gelu_tanh, silu. ReLU in every preset, as the authors
    (simplified_transformers: ``activation_function: leaky_relu`` with slope 0 for every block),
    so an architecture comparison changes the block only (science §7)."""
    tie_embeddings: bool = True
    """Share the token embedding and the unembedding (lm head) matrix."""
    init_std: float = 0.02
    """Every weight matrix and embedding is initialised N(0, init_std²) (science §2); biases 0."""
    pos_encoding: str = "learned"
    """``learned`` absolute position embeddings, or ``rotary`` (RoPE on queries and keys)."""
    dropout: float = 0.0
    """Dropout on embeddings, attention probabilities and branch outputs; in [0, 1)."""
    bias: bool = False
    """Biases in linear layers (and layernorm, if affine)."""
    allow_unregulated: bool = setting(False, RESUMABLE)
    """Allow an ``op`` block with neither qk_norm nor logit_softcap (the paper: it fails)."""
    # -- published mitigations of outlier features (docs/mitigations.md, science.md §9) --------
    attn: str = "softmax"
    """Attention weights from logits z (model/attn.py): ``softmax``; ``softmax1``
    exp(z_i)/(1 + Σ exp z_j) (OrthoAdam, Kaul et al. 2025); ``softpick`` relu(e^z − 1)/Σ|e^z − 1|
    (Zuhri et al. 2025); ``clipped`` clip((ζ−γ)·softmax(z) + γ, 0, 1) (Bondarenko et al. 2023)."""
    clip_zeta: float = 1.0
    """ζ ≥ 1 of ``attn="clipped"`` (stretch above 1; 1 = only γ clips)."""
    clip_gamma: float = -0.03
    """γ ≤ 0 of ``attn="clipped"``: weights below −γ/(ζ−γ) become exactly 0."""
    attn_gate: str = "none"
    """Gated attention (Qiu et al. 2025): y ← SDPA(q, k, v) ⊙ σ(x W_g), x the attention input,
    before the output projection; ``head`` (one gate per head, W_g d × heads), ``elem`` (one per
    element, W_g d × d) or ``none``. Composes with every ``attn``."""
    attn_bias_kv: bool = False
    """Attention bias (Sun et al. 2024): a learnable key and value per head prepended to every
    sequence, visible to every query (QK-Norm and soft-cap apply to it; RoPE does not)."""
    embed_proj: bool = False
    """OSP's EmbProj (Park et al. 2025): a d × d linear after the token (+ position) embedding
    and one before the unembedding, both initialised orthogonal (trained by Muon with ``muon``)."""

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "d_model", "n_head", "seq_len"):
            number(f"model.{name}", getattr(self, name), lo=1, hi=MAX_SIZE[name], integer=True)
        number("model.d_mlp", self.d_mlp, lo=1, hi=MAX_SIZE["d_model"] * 8, integer=True,
               none=True)
        if self.d_model % self.n_head:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_head={self.n_head}; "
                "allowed: d_model a multiple of n_head"
            )
        choice("model.block", self.block, BLOCKS)
        choice("model.norm", self.norm, NORMS)
        choice("model.activation", self.activation, ACTIVATIONS)
        choice("model.pos_encoding", self.pos_encoding, POS_ENCODINGS)
        choice("model.attn", self.attn, ATTENTIONS)
        choice("model.attn_gate", self.attn_gate, ATTN_GATES)
        self.clip_zeta = number("model.clip_zeta", self.clip_zeta, lo=1)
        self.clip_gamma = number("model.clip_gamma", self.clip_gamma, hi=0)
        if self.pos_encoding == "rotary" and self.d_head % 2:
            raise ConfigError(
                f"model.pos_encoding='rotary' needs an even d_head, got {self.d_head}; "
                "allowed: d_model / n_head even"
            )
        self.beta = self._check_beta(self.beta)
        self.logit_softcap = number(
            "model.logit_softcap", self.logit_softcap, lo=0, lo_open=True, none=True
        )
        self.init_std = number("model.init_std", self.init_std, lo=0, lo_open=True)
        self.dropout = number("model.dropout", self.dropout, lo=0, hi=1, hi_open=True)
        for name in (
            "norm_affine", "qk_norm", "beta_trainable", "first_attn_norm", "final_norm",
            "tie_embeddings", "bias", "allow_unregulated", "attn_bias_kv", "embed_proj",
        ):  # fmt: skip
            flag(f"model.{name}", getattr(self, name))
        if (
            self.block == "op"
            and not self.qk_norm
            and self.logit_softcap is None
            and not self.allow_unregulated
        ):
            raise ConfigError(
                "model.block='op' needs entropy regulation (science §2: OP fails to train without "
                "it); allowed: qk_norm=true, logit_softcap=<number>, or allow_unregulated=true"
            )

    @staticmethod
    def _check_beta(beta: Any) -> float | str:
        if beta == "auto":
            return beta
        try:
            value = float(beta) if isinstance(beta, str) else beta
            return number("model.beta", value, lo=0, lo_open=True)
        except (ConfigError, ValueError):
            raise bad("model.beta", beta, "a finite number > 0 or 'auto'") from None

    # -- derived values ------------------------------------------------------------------------

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def mlp_width(self) -> int:
        return self.d_mlp if self.d_mlp is not None else 4 * self.d_model

    @property
    def beta_value(self) -> float:
        """β as a number: ``"auto"`` resolves to 1/√(2·n_layer)."""
        if self.beta == "auto":
            return 1.0 / math.sqrt(2 * self.n_layer)
        return float(self.beta)

    # -- presets and (de)serialisation ---------------------------------------------------------

    @staticmethod
    def presets() -> list[str]:
        return list(PRESETS)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """The named preset of science §2 with ``overrides`` applied (both validated)."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; allowed: {', '.join(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-able, in declaration order."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        """Build and validate; an unknown key raises ``ConfigError`` naming it."""
        allowed = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in allowed:
                raise ConfigError(f"unknown model field {key!r}; allowed: {', '.join(allowed)}")
        return cls(**d)
