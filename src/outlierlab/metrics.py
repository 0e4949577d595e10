"""Every outlier-feature formula (SPEC §1), one-shot and streaming.

All functions take activations ``x`` of shape ``(..., d)``: every leading index is one input
(token), the last axis the d neurons. Any float dtype; sums are taken in float64.

Notation (SPEC §1): n tokens, d neurons, neuron RMS ``s_j = sqrt(mean_α x_{α,j}²)``.

- :func:`kurtosis` — paper Eq. 1, ``mean_j s_j⁴ / (mean_j s_j²)²``, *not* centred over neurons;
  ``1 ≤ Kurt ≤ d``.
- :func:`kurtosis_centred` — the authors' code variant: centre every token across the width,
  then ``var_j(s_j² / mean s²)`` (population variance), i.e. Kurt − 1 of the centred x.
- :func:`max_median_ratio` — Eq. 2, ``mean_α max_j |x_αj| / median_j |x_αj|`` (≥ 1); the median
  of an even count is the mean of the two middle values (as numpy).
- :func:`token_cosine_similarity`, :func:`feature_correlation_rms` — signal propagation.
- :func:`token_excess_kurtosis` — the Outlier-Safe Pre-Training paper's "kurtosis" (per token,
  over the width, minus 3, clipped at 0, averaged over tokens). Not Eq. 1.
- :func:`outlier_neurons`, :func:`share_above` — which neurons, and how many large values.
- :class:`StatsAccumulator` — the streaming form: O(d) memory, batches one at a time, merge,
  ``torch.distributed`` all-reduce; equal to the one-shot values on the union of the batches
  (up to float64 rounding of the summation order).
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

_SCRATCH = 1 << 17  # float64 elements of a CPU scratch chunk (1 MiB)
_CHUNK = 1 << 22  # elements per chunk of a hook's temporaries (bounds their memory, 16 MiB fp32)

LLM_INT8_THRESHOLD = 6.0
"""|x| above which LLM.int8 treats a value as an outlier (Dettmers et al. 2022)."""


def _rows(x: torch.Tensor) -> torch.Tensor:
    """(..., d) → (n, d) float64."""
    if x.dim() == 0:
        raise ValueError("activations must have shape (..., d), got a scalar")
    return x.detach().reshape(-1, x.shape[-1]).to(torch.float64)


def neuron_rms(x: torch.Tensor) -> torch.Tensor:
    """s_j = sqrt(mean_α x_{α,j}²), shape (d,), float64 (SPEC §1)."""
    return _rows(x).square().mean(0).sqrt()


def _kurt_from_sq(sq: torch.Tensor) -> float:
    """Eq. 1 from s_j² (any positive scale of it)."""
    m2 = sq.mean()
    if m2 <= 0:
        return math.nan
    return float(sq.square().mean() / m2.square())


def kurtosis(x: torch.Tensor) -> float:
    """Kurtosis of neuron RMS, paper Eq. 1: ``mean_j s_j⁴ / (mean_j s_j²)²`` (not centred).

    1 when every neuron has the same RMS, d when one neuron carries everything; NaN for all-zero x.
    """
    return _kurt_from_sq(_rows(x).square().mean(0))


def kurtosis_centred(x: torch.Tensor) -> float:
    """Authors'-code variant [SPEC §1, code]: centre each token over the width, then
    ``var_j(s_j² / mean_j s_j²)`` with the population variance, which equals Kurt − 1 of the
    centred activations. ≈ 0 at initialisation (Eq. 1 is ≈ 1)."""
    r = _rows(x)
    return _kurt_from_sq((r - r.mean(1, keepdim=True)).square().mean(0)) - 1.0


def _median_abs(a: torch.Tensor) -> torch.Tensor:
    """Row medians of a non-negative (n, d) tensor; even d → mean of the two middle values."""
    d = a.shape[-1]
    lo, hi = (d - 1) // 2, d // 2
    if a.device.type == "cpu":  # numpy's (SIMD) sort is 4-15× faster than torch.sort/median
        p = np.sort(a.numpy(), axis=-1)
        return (torch.from_numpy(p[:, lo]).double() + torch.from_numpy(p[:, hi]).double()) / 2
    s = a.sort(-1).values
    return (s[:, lo].double() + s[:, hi].double()) / 2


def _cpu_chunks(r: torch.Tensor, index: torch.Tensor | None = None):
    """Row chunks of ``r`` (n, d) — or of its rows ``index`` — of at most ``_CHUNK`` elements on
    CPU (bounds the temporaries of a huge batch; each chunk costs a few op dispatches, so they
    are large); elsewhere all rows at once."""
    if r.device.type != "cpu":
        return (r if index is None else r.index_select(0, index),)
    step = max(1, _CHUNK // max(1, r.shape[-1]))
    if index is None:
        return (r,) if r.numel() <= _CHUNK else r.split(step)
    return (r.index_select(0, i) for i in index.split(step))


def token_mmr(x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token ``max_j |x_αj| / median_j |x_αj|``, shape (n,), float64 (inf where median is 0);
    only the token rows ``index`` when given."""
    r = x.detach().reshape(-1, x.shape[-1])
    out = []
    for c in _cpu_chunks(r, index):
        a = c.abs()
        if a.dtype not in (torch.float32, torch.float64):
            a = a.float()
        out.append(a.amax(-1).double() / _median_abs(a))
    return out[0] if len(out) == 1 else torch.cat(out)


def max_median_ratio(x: torch.Tensor) -> float:
    """Max-median ratio, paper Eq. 2: ``mean_α max_j |x_αj| / median_j |x_αj|`` (≥ 1)."""
    r = token_mmr(x)
    return float(r.mean()) if r.numel() else math.nan


def subsample_tokens(r: torch.Tensor, max_tokens: int | None, seed: int) -> torch.Tensor:
    """A seeded random subset of at most ``max_tokens`` rows (all rows when fewer)."""
    n = r.shape[0]
    if max_tokens is None or n <= max_tokens:
        return r
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[:max_tokens].to(r.device)
    return r.index_select(0, idx)


def offdiag_cosine(
    r: torch.Tensor,
    buf: torch.Tensor | None = None,
    fast: bool = False,
    index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of cos(x_α, x_β) over α ≠ β of the rows of ``r`` (n, d), as a float64 0-d tensor
    (no host sync), in O(n d): with unit rows u_α, ``Σ_{α≠β} u_α·u_β = |Σ_α u_α|² − Σ_α |u_α|²``
    (zero rows count as cosine 0). NaN for fewer than 2 rows. ``buf``: optional float64
    scratch (rows, d) on CPU, used chunk by chunk. ``fast``: sum the unit rows as one
    matrix-vector product ``Xᵀ(1/|x_α|)`` in float32 (float64 input stays float64; about 4×
    cheaper, relative error ~1e-7; used by the monitor's hook); ``index``: only
    these rows (with ``fast``)."""
    n = r.shape[0] if index is None or not fast else index.shape[0]
    if n < 2:
        return torch.tensor(math.nan, dtype=torch.float64, device=r.device)
    if fast:  # Σ_α u_α = Xᵀ (1/|x_α|): one matrix-vector product per chunk, no unit-row copy
        dt = torch.float64 if r.dtype == torch.float64 else torch.float32
        total = torch.zeros(r.shape[1], dtype=dt, device=r.device)
        nonzero = torch.zeros((), dtype=torch.int64, device=r.device)
        for c in _cpu_chunks(r, index):
            c = c.to(dt)
            n2 = c.square().sum(1)
            total += torch.where(n2 > 0, n2.rsqrt(), 0.0) @ c
            nonzero += (n2 > 0).sum()
        return (total.double().square().sum() - nonzero) / (n * (n - 1))
    total = torch.zeros(r.shape[1], dtype=torch.float64, device=r.device)
    norm2 = torch.zeros((), dtype=torch.float64, device=r.device)
    for u in _chunks64(r, buf):
        torch.nn.functional.normalize(u, dim=1, out=u)
        total += u.sum(0)
        norm2 += u.square().sum()
    return (total.square().sum() - norm2) / (n * (n - 1))


def _chunks64(r: torch.Tensor, buf: torch.Tensor | None):
    """Float64 copies of consecutive row chunks of ``r`` (n, d), written into ``buf`` (reused
    and overwritten) when given and on CPU; else one full float64 copy."""
    if buf is None or r.device.type != "cpu" or r.shape[0] <= buf.shape[0]:
        yield r.to(torch.float64, copy=True)
        return
    for chunk in r.split(buf.shape[0]):
        b = buf[: chunk.shape[0]]
        b.copy_(chunk)
        yield b


def token_cosine_similarity(x: torch.Tensor, max_tokens: int | None = 1024, seed: int = 0) -> float:
    """Mean off-diagonal cosine similarity between token representations (SPEC §1 signal
    propagation: the normalised input-wise Gram X Xᵀ/d), on a seeded subsample of at most
    ``max_tokens`` tokens. High means near rank collapse."""
    return float(offdiag_cosine(subsample_tokens(_rows(x), max_tokens, seed)))


def feature_correlation_rms(x: torch.Tensor, max_tokens: int | None = 1024, seed: int = 0) -> float:
    """RMS of the off-diagonal entries of the feature Gram Σ_F = XᵀX/n normalised to unit
    diagonal (uncentred correlations; SPEC §1), on a seeded subsample of ≤ ``max_tokens`` tokens."""
    r = subsample_tokens(_rows(x), max_tokens, seed)
    d = r.shape[1]
    if d < 2:
        return math.nan
    g = r.T @ r / r.shape[0]
    s = g.diagonal().clamp_min(torch.finfo(torch.float64).tiny).sqrt()
    c = g / s[:, None] / s[None, :]
    off = c.square().sum() - c.diagonal().square().sum()
    return float((off / (d * (d - 1))).sqrt())


def token_excess_kurtosis(x: torch.Tensor) -> float:
    """Per-token excess kurtosis over the width, clipped at 0, averaged over tokens:
    ``mean_α max(0, m4_α / m2_α² − 3)`` with centred moments over j (Outlier-Safe Pre-Training's
    "kurtosis"; not paper Eq. 1)."""
    return float(_token_excess_kurtosis(_rows(x)).mean())


def _token_excess_kurtosis(r: torch.Tensor) -> torch.Tensor:
    c = r - r.mean(1, keepdim=True)
    m2 = c.square().mean(1)
    m4 = c.square().square().mean(1)
    k = m4 / m2.square().clamp_min(torch.finfo(torch.float64).tiny) - 3.0
    return k.clamp_min(0.0)


def outlier_neurons(x: torch.Tensor, k: float = OUTLIER_K) -> list[int]:
    """Indices of neurons whose RMS exceeds ``k ×`` the median neuron RMS, largest RMS first.
    See :data:`OUTLIER_K` for the choice of k = 6."""
    return _outliers_from_sq(_rows(x).square().sum(0), k)


def _outliers_from_sq(sq: torch.Tensor, k: float) -> list[int]:
    """Same, from per-neuron sums of squares (RMS order = sum-of-squares order)."""
    s = sq.sort().values
    med = (s[(sq.numel() - 1) // 2] + s[sq.numel() // 2]) / 2
    flagged = torch.nonzero(sq > (k * k) * med).flatten()
    order = torch.argsort(sq[flagged], descending=True, stable=True)
    return [int(i) for i in flagged[order]]


def share_above(x: torch.Tensor, threshold: float = LLM_INT8_THRESHOLD) -> float:
    """Fraction of all entries with ``|x| > threshold`` (6 = the LLM.int8 threshold)."""
    x = x.detach()
    return float((x.abs() > threshold).sum().double() / max(x.numel(), 1))


class StatsAccumulator:
    """Streaming Eq. 1, Eq. 2 and friends for one layer of width d, O(d) memory.

    Keeps, in float64: per-neuron Σ x² (→ s_j²), the token count, Σ of per-token MMR, and a
    running sum/count of cosine-similarity values (:meth:`add_cos`, one value per measured
    forward, averaged); with ``extras`` (default) also per-neuron Σ of token-centred x²
    (centred kurtosis), Σ of per-token excess kurtosis and the count of |x| > ``threshold``.
    ``update`` never calls ``.item()`` so it does not synchronise a GPU.
    Results equal the one-shot functions on the union of all batches.
    """

    def __init__(
        self,
        d: int,
        device: torch.device | str = "cpu",
        threshold: float = LLM_INT8_THRESHOLD,
        extras: bool = True,
    ):
        if d < 1:
            raise ValueError(f"width d must be ≥ 1, got {d}")
        self.d, self.threshold, self.extras = d, threshold, extras
        # layout of the single float64 state vector (one all_reduce moves everything):
        # [0:d) Σx², [d:2d) Σ(x-μ)², then tokens, Σmmr, mmr tokens, Σexkurt, n>|t|, Σcos, n cos
        self.state = torch.zeros(2 * d + 7, dtype=torch.float64, device=device)
        self._buf: torch.Tensor | None = None  # scratch for _sum_sq64 (not state)
        self._counts = [0, 0, 0]  # tokens, MMR tokens, cos values not yet in ``state``

    # views into the state
    @property
    def sum_sq(self) -> torch.Tensor:
        return self.state[: self.d]

    @property
    def sum_sq_centred(self) -> torch.Tensor:
        return self.state[self.d : 2 * self.d]

    @property
    def _scalars(self) -> torch.Tensor:
        return self.state[2 * self.d :]

    @property
    def tokens(self) -> int:
        return int(self._scalars[0]) + self._counts[0]

    def _flush(self) -> None:
        """Move the host-side counts (kept as Python ints so ``update`` adds no tiny tensor ops)
        into the state vector."""
        if any(self._counts):
            idx = (0, 2, 6)
            for i, c in zip(idx, self._counts):
                if c:
                    self._scalars[i] += c
            self._counts = [0, 0, 0]

    def update(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mmr_max_tokens: int | None = None,
        seed: int = 0,
        mmr_index: torch.Tensor | None = None,
    ) -> StatsAccumulator:
        """Add a batch ``x`` (..., d); ``mask`` (same leading shape, true = keep) drops padding.
        ``mmr_max_tokens`` limits Eq. 2 to a seeded subsample of tokens (None: all tokens);
        ``mmr_index`` gives those token rows directly (after masking)."""
        if x.shape[-1] != self.d:
            raise ValueError(f"expected width {self.d}, got shape {tuple(x.shape)}")
        d = self.d
        r = x.detach().reshape(-1, d)
        if mask is not None:
            r = r[mask.detach().reshape(-1).to(device=r.device, dtype=torch.bool)]
        n = r.shape[0]
        sc = self._scalars
        self._counts[0] += n
        if not n:
            return self
        if not self.extras:
            self.sum_sq.add_(self._sum_sq64(r))
        else:
            r64 = r.to(torch.float64)
            sq = r64.square()
            col_sq = sq.sum(0)
            self.sum_sq.add_(col_sq)
        if mmr_index is not None:
            sc[1] += token_mmr(r, mmr_index).sum()
            self._counts[1] += mmr_index.shape[0]
        else:
            rm = subsample_tokens(r, mmr_max_tokens, seed)
            sc[1] += token_mmr(rm).sum()
            self._counts[1] += rm.shape[0]
        if self.extras:
            # centred moments from raw ones with matrix-vector products (one pass each):
            # Σ_α (x_αj − μ_α)² = Σ_α x_αj² − 2 Σ_α x_αj μ_α + Σ_α μ_α²
            w = torch.full((d,), 1.0 / d, dtype=torch.float64, device=r.device)
            mu, m2 = r64 @ w, sq @ w
            self.sum_sq_centred.add_(col_sq - 2 * (r64.T @ mu) + mu.square().sum())
            m3, m4 = (sq * r64) @ w, sq.square() @ w
            var = m2 - mu.square()
            c4 = m4 - 4 * mu * m3 + 6 * mu.square() * m2 - 3 * mu.square().square()
            tiny = torch.finfo(torch.float64).tiny
            sc[3] += (c4 / var.square().clamp_min(tiny) - 3.0).clamp_min(0.0).sum()
            sc[4] += (r.abs() > self.threshold).sum()
        return self

    def scratch(self) -> torch.Tensor | None:
        """A reused float64 (rows, d) buffer of about 1 MiB for chunked CPU sums."""
        if self.state.device.type != "cpu":
            return None
        if self._buf is None:
            self._buf = torch.empty(max(1, _SCRATCH // self.d), self.d, dtype=torch.float64)
        return self._buf

    def _sum_sq64(self, r: torch.Tensor) -> torch.Tensor:
        """Σ_α x_αj² in float64, chunk by chunk through :meth:`scratch` on CPU (a full float64
        copy of a large batch costs more than the sum itself)."""
        out = torch.zeros(self.d, dtype=torch.float64, device=r.device)
        for b in _chunks64(r, self.scratch()):
            out += b.square_().sum(0)
        return out

    def add_cos(self, value: float | torch.Tensor, valid: bool | None = None) -> None:
        """Record one cosine-similarity value (e.g. one per measured forward); NaN is ignored.
        ``valid=True`` promises a non-NaN value (no check, no extra tensor ops)."""
        if valid:
            self._scalars[5] += value
            self._counts[2] += 1
            return
        v = torch.as_tensor(value, dtype=torch.float64, device=self.state.device)
        ok = ~torch.isnan(v)
        self._scalars[5] += torch.where(ok, v, 0.0)
        self._scalars[6] += ok.double()

    def merge(self, other: StatsAccumulator) -> StatsAccumulator:
        """Add another accumulator's statistics (same d) into this one."""
        if other.d != self.d:
            raise ValueError(f"cannot merge width {other.d} into width {self.d}")
        self._flush()
        other._flush()
        self.state += other.state.to(self.state.device)
        return self

    def all_reduce(self, group=None) -> StatsAccumulator:
        """Sum the statistics over all ``torch.distributed`` ranks (in place; no-op when not
        initialised)."""
        import torch.distributed as dist

        self._flush()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.state, op=dist.ReduceOp.SUM, group=group)
        return self

    def copy(self) -> StatsAccumulator:
        new = StatsAccumulator(self.d, self.state.device, self.threshold, self.extras)
        self._flush()
        new.state.copy_(self.state)
        return new

    def reset(self) -> None:
        self.state.zero_()
        self._counts = [0, 0, 0]

    def result(self, k: float = OUTLIER_K) -> dict:
        """``kurtosis`` (Eq. 1), ``mmr`` (Eq. 2), ``cos_sim``, ``outlier_neurons`` (indices,
        largest RMS first), ``tokens``; with ``extras`` also ``kurtosis_centred``,
        ``token_excess_kurtosis`` and ``share_above_6``. NaN where no data."""
        self._flush()
        st = self.state.cpu()
        d = self.d
        n, s_mmr, n_mmr, s_ek, n_big, s_cos, n_cos = st[2 * d :].tolist()
        sq = st[:d]
        nan = math.nan
        out = {
            "kurtosis": _kurt_from_sq(sq) if n else nan,
            "mmr": s_mmr / n_mmr if n_mmr else nan,
            "cos_sim": s_cos / n_cos if n_cos else nan,
            "outlier_neurons": _outliers_from_sq(sq, k) if n else [],
            "tokens": int(n),
        }
        if self.extras:
            out["kurtosis_centred"] = (_kurt_from_sq(st[d : 2 * d]) - 1.0) if n else nan
            out["token_excess_kurtosis"] = s_ek / n if n else nan
            out[f"share_above_{self.threshold:g}"] = n_big / (n * d) if n else nan
        return out
