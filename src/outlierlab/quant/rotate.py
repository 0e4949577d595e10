"""Rotation baseline (QuaRot-style, Ashkboos et al. 2024) for Llama-family HF models and
outlierlab's own GPT (:func:`rotate_gpt`).

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
down-projection input (unless ``online_hadamard``) and the rotation of attention values /
KV cache; the o_proj input therefore keeps its outliers.

outlierlab's GPT (:func:`rotate_gpt`) has LayerNorms: LN(x) = γ ⊙ (x − μ)/σ + β is the
RMS normalisation of x's component orthogonal to u = 1/√d (SliceGPT, Ashkboos et al. 2024),
so in the rotated stream x' = x·Q it becomes :class:`CentredRMSNorm` with u' = u·Q, and γ, β
fold into the linears that read it (W ← W·diag(γ), b ← b + W·β). Blocks without a norm (OP)
read the stream directly: their linears take the rotation alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from outlierlab.errors import ConfigError


def _is_prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, int(q**0.5) + 1))


def _sylvester(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.int64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _paley(n: int) -> torch.Tensor | None:
    """A Hadamard matrix of order n by Paley's construction over GF(q), q prime (Paley 1933):
    I for q = n − 1 ≡ 3 (mod 4), II for q = n/2 − 1 ≡ 1 (mod 4); None if neither applies."""
    def jacobsthal(q: int) -> torch.Tensor:  # Q_ij = χ(j − i), χ the quadratic character
        squares = {(i * i) % q for i in range(1, q)}
        chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)])
        idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
        return chi[idx]

    q = n - 1
    if q % 4 == 3 and _is_prime(q):
        c = torch.zeros(n, n, dtype=torch.int64)  # skew conference matrix, H = I + C
        c[0, 1:], c[1:, 0] = 1, -1
        c[1:, 1:] = jacobsthal(q)
        return torch.eye(n, dtype=torch.int64) + c
    q = n // 2 - 1
    if n % 2 == 0 and q % 4 == 1 and _is_prime(q):
        c = torch.zeros(q + 1, q + 1, dtype=torch.int64)  # symmetric conference matrix
        c[0, 1:], c[1:, 0] = 1, 1
        c[1:, 1:] = jacobsthal(q)
        a = torch.tensor([[1, -1], [-1, -1]])
        b = torch.tensor([[1, 1], [1, -1]])
        return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.int64), b)
    return None


def hadamard_factors(n: int) -> list[torch.Tensor] | None:
    """Integer Hadamard matrices whose Kronecker product has order n: [H_{2^k}, H_m1, ...] with
    each H_m from :func:`_paley`, the power of two as large as possible (576 → [H_16, H_36],
    1536 → [H_128, H_12]); None when no such factorisation exists (n = 9, 18, 3·2^k, …)."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1  # n = 2^k · odd
    for twos in range(k, -1, -1):
        tail = _paley_product(n >> twos)
        if tail is not None:
            return [f for f in [_sylvester(1 << twos), *tail] if f.shape[0] > 1] or [_sylvester(1)]
    return None


def _paley_product(rest: int) -> list[torch.Tensor] | None:
    if rest == 1:
        return []
    for m in range(4, rest + 1, 4):
        if rest % m == 0 and (pm := _paley(m)) is not None:
            tail = _paley_product(rest // m)
            if tail is not None:
                return [pm, *tail]
    return None


def hadamard(n: int) -> torch.Tensor | None:
    """An n × n matrix of ±1 with H Hᵀ = n I (int64), or None (:func:`hadamard_factors`)."""
    factors = hadamard_factors(n)
    if factors is None:
        return None
    h = factors[0]
    for f in factors[1:]:
        h = torch.kron(h, f)
    return h


def apply_hadamard(x: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    """x · (H_1 ⊗ H_2 ⊗ …) / √n over the last dim, one small contraction per factor:
    O(n Σ m_i) per row instead of O(n²). ``factors``: float matrices of the x's dtype."""
    n = x.shape[-1]
    sizes = [f.shape[0] for f in factors]
    y = x.reshape(*x.shape[:-1], *sizes)
    nd = len(sizes)
    for i, f in enumerate(factors):  # contract axis i: y_..a.. → Σ_a y_..a.. f_ab
        y = torch.movedim(torch.movedim(y, -nd + i, -1) @ f, -1, -nd + i)
    return y.reshape(x.shape) * n**-0.5


class OnlineHadamard(nn.Module):
    """QuaRot's online rotation of a linear's input, x → x · H / √n, as a forward pre-hook
    (``hook``); the linear's weight is rotated offline by the same H, so y is unchanged."""

    def __init__(self, factors: list[torch.Tensor]) -> None:
        super().__init__()
        self.n_factors = len(factors)
        for i, f in enumerate(factors):
            self.register_buffer(f"f{i}", f.to(torch.float32))

    def factors(self, dtype: torch.dtype) -> list[torch.Tensor]:
        return [getattr(self, f"f{i}").to(dtype) for i in range(self.n_factors)]

    def hook(self, module: nn.Module, args: tuple) -> tuple:
        x = args[0]
        return (apply_hadamard(x, self.factors(x.dtype)), *args[1:])


def rotation_matrix(d: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal float64 (d, d): the normalised Hadamard matrix of :func:`hadamard` when d has
    one (every power of two, 12·2^k, 576, …), else a seeded random (Haar) orthogonal matrix."""
    h = hadamard(d)
    if h is not None:
        return h.double() / d**0.5
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
def rotate(model: nn.Module, seed: int = 0, online_hadamard: bool = False) -> nn.Module:
    """A rotated, function-preserving deep copy of a Llama-family HF causal LM or of
    outlierlab's GPT (module docstring; ``online_hadamard``: the down-projection input rotated
    online as well); ``model`` is untouched. ConfigError for other architectures."""
    from outlierlab.model.gpt import GPT

    if isinstance(model, GPT):
        return rotate_gpt(model, seed, online_hadamard)
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
        if online_hadamard:
            _online(m.down_proj)
    _fold(base.norm, [head])
    _read(head, q)
    emb = base.embed_tokens.weight
    emb.data = (emb.double() @ q).to(emb.dtype)
    return model


def _online(lin: nn.Linear) -> None:
    """QuaRot's online Hadamard on ``lin``'s input: W ← W·H/√n offline, x ← x·H/√n online (a
    pre-hook the quantised linear keeps); nothing when n has no Hadamard matrix."""
    factors = hadamard_factors(lin.weight.shape[1])
    if factors is None:
        return
    w = lin.weight
    w.data = apply_hadamard(w.double(), [f.double() for f in factors]).to(w.dtype)
    lin.online_hadamard = OnlineHadamard(factors)
    lin.register_forward_pre_hook(lin.online_hadamard.hook)


class CentredRMSNorm(nn.Module):
    """A LayerNorm without affine in a rotated basis: x − (x·u)u over rms of the same, eps as
    the LayerNorm's (u: the rotated mean direction 1/√d · Q, a unit row)."""

    def __init__(self, u: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("u", u)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.u.to(x.dtype)
        x = x - (x @ u)[..., None] * u
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + self.eps)


def _fold_gpt_norm(norm: nn.Module, readers: list[nn.Linear], q: torch.Tensor) -> nn.Module:
    """Fold ``norm``'s per-channel affine into ``readers`` (in float64) and return the module
    that replaces it in the rotated stream (the norm itself when it commutes with Q)."""
    gamma = getattr(norm, "weight", None)
    beta = getattr(norm, "bias", None)
    for lin in readers:
        w = lin.weight.double()
        if beta is not None:
            b = w @ beta.double() + (lin.bias.double() if lin.bias is not None else 0.0)
            lin.bias = nn.Parameter(b.to(lin.weight.dtype), requires_grad=False)
        if gamma is not None:
            lin.weight.data = (w * gamma.double()).to(lin.weight.dtype)
    if isinstance(norm, nn.LayerNorm):
        d = q.shape[0]
        u = (torch.full((1, d), d**-0.5, dtype=torch.float64, device=q.device) @ q)[0]
        return CentredRMSNorm(u.to(torch.float32), norm.eps)
    if gamma is not None:  # RMSNorm: the gain is folded
        norm.weight.data.fill_(1.0)
    return norm  # RMSNorm without gain, SSNorm (one scalar) and Identity commute with Q


@torch.no_grad()
def rotate_gpt(model: nn.Module, seed: int = 0, online_hadamard: bool = False) -> nn.Module:
    """A rotated, function-preserving deep copy of outlierlab's GPT (pre or OP blocks, every
    norm kind and mitigation): the residual stream x → x·Q, LayerNorms as
    :class:`CentredRMSNorm` with their affine folded into the readers, the head untied;
    ``online_hadamard``: each MLP down-projection's input rotated online as in QuaRot."""
    if model.config.block == "post":
        raise ConfigError("the rotation baseline needs pre or OP blocks; a post block "
                          "normalises the residual stream itself")  # fmt: skip
    model = copy.deepcopy(model).eval()
    if model.lm_head.weight is model.tok_emb.weight:  # tied: the head gets its own copy
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(),
                                            requires_grad=False)  # fmt: skip
    q = rotation_matrix(model.config.d_model, seed).to(model.tok_emb.weight.device)
    for b in model.blocks:
        a, m = b.attn, b.mlp
        attn_readers = [a.qkv] + ([a.gate] if a.gate is not None else [])
        b.attn_norm = _fold_gpt_norm(b.attn_norm, attn_readers, q)
        b.mlp_norm = _fold_gpt_norm(b.mlp_norm, [m.fc], q)
        for lin in (*attn_readers, m.fc):
            _read(lin, q)
        _write(a.proj, q)
        _write(m.proj, q)
        if online_hadamard:
            _online(m.proj)
    head = model.unembed_proj if model.unembed_proj is not None else model.lm_head
    model.final_norm = _fold_gpt_norm(model.final_norm, [head], q)
    _read(head, q)
    if model.embed_proj is not None:  # the projection writes the stream
        _write(model.embed_proj, q)
    else:
        for emb in (model.tok_emb, model.pos_emb):
            if emb is not None:
                emb.weight.data = (emb.weight.double() @ q).to(emb.weight.dtype)
    return model
