"""The outlier-feature formulas of science §1, one-shot, in the order science §1 lists them.

All functions take activations ``x`` of shape ``(..., d)``: every leading index is one input
(token), the last axis the d neurons. Any float dtype; sums are taken in float64.
Notation (science §1): n tokens, d neurons, neuron RMS ``s_j = sqrt(mean_α x_{α,j}²)``.

The streaming form (O(d) memory, batches one at a time, merge, all-reduce) and the chunked
kernels the monitor's hook uses live in :mod:`outlierlab.stats`; they compute these same
formulas from per-neuron sums.
"""

from __future__ import annotations

import math

import numpy as np
import torch

OUTLIER_K = 6.0
"""Default k of :func:`outlier_neurons`: a neuron is an outlier when its RMS exceeds k × the
median neuron RMS. At initialisation all s_j agree within a few per cent, so 6× is far beyond
noise; one such neuron adds about k⁴/d to Kurt (≈ +1.7 at d = 768), i.e. it is exactly the kind of
neuron that moves Eq. 1; and 6 matches the LLM.int8 magnitude threshold of :func:`share_above`."""

LLM_INT8_THRESHOLD = 6.0
"""|x| above which LLM.int8 treats a value as an outlier (Dettmers et al. 2022; science §1)."""

_TINY = torch.finfo(torch.float64).tiny


def rows64(x: torch.Tensor) -> torch.Tensor:
    """(..., d) → (n, d) float64, detached: the n × d matrix X of science §1."""
    if x.dim() == 0:
        raise ValueError("activations must have shape (..., d), got a scalar")
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


# -- neuron RMS and its kurtosis (science §1, paper Eq. 1) ---------------------------------------


def neuron_rms(x: torch.Tensor) -> torch.Tensor:
    """science §1: ``s_j = sqrt(mean_α x_{α,j}²)``, shape (d,), float64."""
    return rows64(x).square().mean(0).sqrt()


Sums = torch.Tensor | np.ndarray
"""A per-neuron sum vector: a tensor (any device) or a float64 numpy array (the streaming
accumulator's host copy); the ``*_from_sq``/``*_from_sums`` formulas read it in numpy."""


def _host(v: Sums) -> np.ndarray:
    """``v`` as a float64 numpy array (a d-vector: the copy is cheap)."""
    if isinstance(v, torch.Tensor):
        v = v.detach().to("cpu", torch.float64).numpy()
    return np.asarray(v, dtype=np.float64)


def kurtosis_from_sq(sq: Sums) -> float:
    """science §1 Eq. 1 from ``s_j²`` (or any positive multiple of it, e.g. Σ_α x_αj²):
    ``mean_j s_j⁴ / (mean_j s_j²)²``; NaN when every s_j is 0."""
    sq = _host(sq)
    m2 = sq.mean()
    if m2 <= 0:
        return math.nan
    return float((sq * sq).mean() / (m2 * m2))


def kurtosis(x: torch.Tensor) -> float:
    """Kurtosis of neuron RMS, science §1 Eq. 1: ``mean_j s_j⁴ / (mean_j s_j²)²``, not centred over
    neurons. 1 when every neuron has the same RMS, d when one carries everything; NaN for zero x."""
    return kurtosis_from_sq(rows64(x).square().mean(0))


def kurtosis_centred(x: torch.Tensor) -> float:
    """The authors'-code variant of Eq. 1 (science §1 [code]): centre each token over the width,
    then ``var_j(s_j² / mean_j s_j²)`` (population variance), which equals Kurt − 1 of the
    centred activations. ≈ 0 at initialisation (Eq. 1 is ≈ 1)."""
    r = rows64(x)
    return kurtosis_from_sq((r - r.mean(1, keepdim=True)).square().mean(0)) - 1.0


# -- the authors' code, literally (science §1 [code]) --------------------------------------------
# simplified_transformers/train_utils.py, ``compute_loss`` (bobby-he/simplified_transformers):
#   x = x - x.mean(-1, keepdim=True);  x_rms = (x**2).mean().sqrt() + 1e-8;  flat_x = x / x_rms
#   kurtosis        = diag(flat_xᵀ flat_x / n).var()            (torch's default: unbiased)
#   batch_corr_mean = off-diagonal mean of flat_x flat_xᵀ / d   (n × n, every token of the batch)
# Both follow from per-neuron sums of the token-centred c_α = x_α − mean_j x_αj, so they stream:
# Q_j = Σ_α c_αj² and S_j = Σ_α c_αj, with Σ_{α≠β} c_α·c_β = |S|² − Σ_j Q_j.

AUTHORS_RMS_EPS = 1e-8
"""Added to the global RMS of the centred activations in the authors' code (``x_rms``)."""


def centred_rows(x: torch.Tensor) -> torch.Tensor:
    """The rows of X (float64) each centred over the width: ``c_αj = x_αj − mean_j x_αj``."""
    r = rows64(x)
    return r - r.mean(1, keepdim=True)


def _authors_ms(sq_centred: np.ndarray, n: int) -> float:
    """``x_rms²`` of the authors' code: (sqrt(mean of c²) + 1e-8)² (a mean below 0, from
    rounding in sums centred after the fact, counts as 0)."""
    mean = max(float(sq_centred.sum()) / (n * sq_centred.size), 0.0)
    return (math.sqrt(mean) + AUTHORS_RMS_EPS) ** 2


def kurtosis_authors_from_sums(sq_centred: Sums, n: int) -> float:
    """:func:`kurtosis_authors` from ``Q_j = Σ_α c_αj²`` over ``n`` tokens (what the streaming
    form keeps): the unbiased variance over j of ``Q_j / (n · x_rms²)``. NaN for n = 0 or d < 2."""
    sq_centred = _host(sq_centred)
    if n <= 0 or sq_centred.size < 2:
        return math.nan
    return float((sq_centred / (n * _authors_ms(sq_centred, n))).var(ddof=1))


def corr_authors_from_sums(sum_centred: Sums, sq_centred: Sums, n: int) -> float:
    """:func:`corr_authors` from ``S_j = Σ_α c_αj`` and ``Q_j = Σ_α c_αj²`` over ``n`` tokens:
    ``(|S|² − Σ_j Q_j) / (n (n − 1) · d · x_rms²)``. NaN for n < 2."""
    if n < 2:
        return math.nan
    sum_centred, sq_centred = _host(sum_centred), _host(sq_centred)
    off = float(sum_centred @ sum_centred - sq_centred.sum())
    return off / (n * (n - 1) * sq_centred.size * _authors_ms(sq_centred, n))


def kurtosis_authors(x: torch.Tensor) -> float:
    """The authors' logged "kurtosis" (science §1 [code]; ``train_utils.py``, ``compute_loss``):
    centre each token over the width, divide by the global RMS (+1e-8), and take the *unbiased*
    variance over neurons of ``s_j² / x_rms²``. Without the 1e-8 this is
    ``d/(d−1) · (Kurt(c) − 1)`` with Kurt of Eq. 1 on the centred ``c``: ≈ 0 at initialisation
    where Eq. 1 is ≈ 1. Ours (:func:`kurtosis`) is uncentred, population, not shifted by 1; and
    the authors measure HF GPT-2 ``hidden_states`` (the last one after the final LN, padding
    included, in the model's dtype) where we measure before any final norm, without padding,
    in float64."""
    c = centred_rows(x)
    return kurtosis_authors_from_sums(c.square().sum(0), c.shape[0])


def corr_authors(x: torch.Tensor) -> float:
    """The authors' signal-propagation curve, ``batch_corr_mean`` (science §1 [code];
    ``train_utils.py``, ``compute_loss``): mean off-diagonal entry of the input-wise Gram
    ``flat_x flat_xᵀ / d`` of the token-centred x divided by its global RMS (+1e-8), over every
    token (no subsample: the sum identity makes it O(n d)). Unlike our
    :func:`token_cosine_similarity` (a mean of true per-pair cosines, uncentred) each pair is
    normalised by the *global* mean square, so tokens with large norms weigh more."""
    c = centred_rows(x)
    return corr_authors_from_sums(c.sum(0), c.square().sum(0), c.shape[0])


# -- attention entropy (science §2 entropy regulation; the authors' ``attn.{i}.entropy``) ----------


def attention_entropy_sum(probs: torch.Tensor) -> torch.Tensor:
    """Σ over every query row of ``probs`` (..., T_q, T_k), each a distribution over keys, of its
    Shannon entropy in nats, ``−Σ_k p log p`` with 0 log 0 = 0 (the authors' ``nansum``); a
    float64 0-d tensor (no host sync). Divide by ``probs[..., 0].numel()`` for the mean."""
    return torch.special.entr(probs.detach().float()).sum(-1).sum(dtype=torch.float64)


def softmax_entropy_sum(probs: torch.Tensor, logits: torch.Tensor, *,
                        overwrite: bool = False) -> torch.Tensor:  # fmt: skip
    """:func:`attention_entropy_sum` of ``probs = softmax(logits)`` over the last axis, where
    ``logits`` are −∞ (or the dtype's most negative number) at masked keys, without a logarithm
    per entry: with m a row's largest logit and p* its largest probability,
    log p_k = z_k − m + log p*, so H = −Σ_k p_k log p_k = Σ_k p_k (m − z_k) − log p*, every
    term ≥ 0 (no cancellation; masked keys add 0). About 3× cheaper than ``entr`` on causal
    rows, whose zeros take its slow path. ``overwrite``: float32 ``logits`` are used as scratch
    (one copy and one pass fewer); they must then be finite at masked keys (0 · ∞ is NaN)."""
    probs, z = probs.detach().float(), logits.detach().float()
    m = z.amax(-1, keepdim=True)
    gap = z.sub_(m) if overwrite else (z - m).nan_to_num_(neginf=0.0)  # z − m ≤ 0; masked: p = 0
    spread = torch.linalg.vecdot(probs, gap).neg_()
    return (spread - probs.amax(-1).log()).sum(dtype=torch.float64)


def attention_entropy(probs: torch.Tensor) -> float:
    """Mean entropy (nats) of the attention distributions ``probs`` (B, heads, T_q, T_k) over
    batch, heads and query positions: the authors' ``attn.{i}.entropy`` (``train_utils.py``).
    Collapse towards 0 (every query attends to one key) is the failure QK-Norm prevents in OP
    blocks (science §2). A causal row at position t has at most log(t + 1)."""
    rows = probs[..., 0].numel()
    return float(attention_entropy_sum(probs)) / rows if rows else math.nan


def causal_attention_probs(logits: torch.Tensor) -> torch.Tensor:
    """``softmax(logits + causal mask)`` over the last axis in float32, from pre-softmax logits
    (..., T, T) (already scaled/soft-capped); query t sees keys 0..t."""
    t = logits.shape[-1]
    future = torch.full((t, t), float("-inf"), device=logits.device).triu(1)  # 0 on and below
    return (logits.float() + future).softmax(-1)  # an add is cheaper than masked_fill


# -- max-median ratio (science §1, paper Eq. 2) --------------------------------------------------


def median_abs(a: torch.Tensor) -> torch.Tensor:
    """Row medians (float64) of a non-negative (n, d) tensor; for even d the mean of the two
    middle values (as numpy's median)."""
    d = a.shape[-1]
    lo, hi = (d - 1) // 2, d // 2
    if a.device.type == "cpu":  # numpy's (SIMD) sort is 4-15× faster than torch.sort/median
        p = np.sort(a.numpy(), axis=-1)
        return (torch.from_numpy(p[:, lo]).double() + torch.from_numpy(p[:, hi]).double()) / 2
    s = a.sort(-1).values
    return (s[:, lo].double() + s[:, hi].double()) / 2


def token_mmr(r: torch.Tensor) -> torch.Tensor:
    """The summand of science §1 Eq. 2 for each row of ``r`` (n, d): ``max_j |x_αj| / median_j
    |x_αj|``, shape (n,), float64 (inf where the median is 0)."""
    a = r.detach().abs()
    if a.dtype not in (torch.float32, torch.float64):
        a = a.float()
    return a.amax(-1).double() / median_abs(a)


def max_median_ratio(x: torch.Tensor) -> float:
    """Max-median ratio, science §1 Eq. 2: ``mean_α max_j |x_αj| / median_j |x_αj|`` (≥ 1)."""
    r = token_mmr(x.detach().reshape(-1, x.shape[-1]))
    return float(r.mean()) if r.numel() else math.nan


# -- signal propagation (science §1) -------------------------------------------------------------


def subsample_tokens(r: torch.Tensor, max_tokens: int | None, seed: int) -> torch.Tensor:
    """science §1 [choice]: a seeded random subset of at most ``max_tokens`` rows of ``r`` (all
    rows when there are fewer), bounding the n² cost of the Gram-based metrics."""
    n = r.shape[0]
    if max_tokens is None or n <= max_tokens:
        return r
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:max_tokens].to(r.device)
    return r.index_select(0, idx)


def offdiag_cosine(r: torch.Tensor) -> torch.Tensor:
    """science §1 signal propagation: mean of cos(x_α, x_β) over α ≠ β of the rows of ``r`` (n, d),
    a float64 0-d tensor (no host sync). O(n d) rather than n²: with unit rows u_α,
    ``Σ_{α≠β} u_α·u_β = |Σ_α u_α|² − Σ_α |u_α|²`` (zero rows count as cosine 0). NaN for n < 2."""
    n = r.shape[0]
    if n < 2:
        return torch.tensor(math.nan, dtype=torch.float64, device=r.device)
    u = torch.nn.functional.normalize(r.to(torch.float64), dim=1)
    return (u.sum(0).square().sum() - u.square().sum()) / (n * (n - 1))


def token_cosine_similarity(x: torch.Tensor, max_tokens: int | None = 1024, seed: int = 0) -> float:
    """science §1: mean off-diagonal cosine similarity between token representations (the
    normalised input-wise Gram X Xᵀ/d), on a seeded subsample of at most ``max_tokens`` tokens.
    High means near rank collapse."""
    return float(offdiag_cosine(subsample_tokens(rows64(x), max_tokens, seed)))


def feature_correlation_rms(x: torch.Tensor, max_tokens: int | None = 1024, seed: int = 0) -> float:
    """science §1: RMS of the off-diagonal entries of the feature Gram Σ_F = XᵀX/n normalised to
    unit diagonal (uncentred correlations), on a seeded subsample of ≤ ``max_tokens`` tokens."""
    r = subsample_tokens(rows64(x), max_tokens, seed)
    d = r.shape[1]
    if d < 2:
        return math.nan
    g = r.T @ r / r.shape[0]
    s = g.diagonal().clamp_min(_TINY).sqrt()
    c = g / s[:, None] / s[None, :]
    off = c.square().sum() - c.diagonal().square().sum()
    return float((off / (d * (d - 1))).sqrt())


# -- other projects' "kurtosis" (science §1: each under its own name) ----------------------------


def token_excess_kurtosis(x: torch.Tensor) -> float:
    """science §1, the Outlier-Safe Pre-Training paper's "kurtosis" (not Eq. 1): per-token excess
    kurtosis over the width, clipped at 0, averaged over tokens:
    ``mean_α max(0, m4_α / m2_α² − 3)`` with moments centred over j."""
    c = rows64(x)
    c = c - c.mean(1, keepdim=True)
    m2 = c.square().mean(1)
    m4 = c.square().square().mean(1)
    return float((m4 / m2.square().clamp_min(_TINY) - 3.0).clamp_min(0.0).mean())


# -- which neurons, how many large values (science §1 [choice]) ----------------------------------


def outliers_from_sq(sq: Sums, k: float = OUTLIER_K) -> list[int]:
    """science §1 [choice]: indices j with ``s_j > k × median_j s_j``, largest first (ties by
    index), from ``s_j²`` or any positive multiple of it (RMS order = sum-of-squares order)."""
    sq = _host(sq)
    s = np.sort(sq)
    med = (s[(sq.size - 1) // 2] + s[sq.size // 2]) / 2
    flagged = np.flatnonzero(sq > (k * k) * med)
    return flagged[np.argsort(-sq[flagged], kind="stable")].tolist()


def outlier_neurons(x: torch.Tensor, k: float = OUTLIER_K) -> list[int]:
    """science §1 [choice]: indices of neurons whose RMS exceeds ``k ×`` the median neuron RMS,
    largest RMS first. See :data:`OUTLIER_K` for the choice of k = 6."""
    return outliers_from_sq(rows64(x).square().sum(0), k)


def share_above(x: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD) -> float:
    """science §1 [choice]: fraction of all entries with ``|x| > threshold`` (6 = LLM.int8's)."""
    x = x.detach()
    return float((x.abs() > threshold).sum().double() / max(x.numel(), 1))
