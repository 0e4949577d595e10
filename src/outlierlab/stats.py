"""Streaming science §1 metrics: :class:`StatsAccumulator` and the chunked kernels of the hook.

science §1 "Streaming": Kurt (Eq. 1), MMR (Eq. 2) and the authors' ``kurtosis`` and
``batch_corr_mean`` (:func:`~outlierlab.metrics.kurtosis_authors`,
:func:`~outlierlab.metrics.corr_authors`) need only per-neuron sums over tokens, so a
layer's statistics fit in O(d) float64 numbers (:class:`LayerSums`) that can be added batch by
batch, merged, and all-reduced over ``torch.distributed`` ranks. :meth:`StatsAccumulator.result`
turns them into the formulas of :mod:`outlierlab.metrics` and equals the one-shot functions on
the union of the batches (up to float64 rounding of the summation order).

On CPU the kernels work in row chunks (``_CHUNK`` elements) so a huge batch never makes a
float64 copy of itself; elsewhere they take all rows at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch

from outlierlab.metrics import (
    LLM_INT8_THRESHOLD,
    OUTLIER_K,
    corr_authors_from_sums,
    kurtosis_authors_from_sums,
    kurtosis_from_sq,
    outliers_from_sq,
    subsample_tokens,
    token_mmr,
)

_SCRATCH = 1 << 17  # float64 elements of a CPU scratch chunk (1 MiB)
_CHUNK = 1 << 22  # elements per chunk of a hook's temporaries (bounds their memory, 16 MiB fp32)
_TINY = torch.finfo(torch.float64).tiny

# -- chunking ---------------------------------------------------------------------------------


def _row_chunks(r: torch.Tensor, index: torch.Tensor | None = None) -> Iterator[torch.Tensor]:
    """Row chunks of ``r`` (n, d) — or of its rows ``index`` — of at most ``_CHUNK`` elements on
    CPU (bounds the temporaries of a huge batch; each chunk costs a few op dispatches, so they
    are large); elsewhere all rows at once."""
    if r.device.type != "cpu":
        yield r if index is None else r.index_select(0, index)
        return
    step = max(1, _CHUNK // max(1, r.shape[-1]))
    if index is None:
        yield from (r,) if r.numel() <= _CHUNK else r.split(step)
    else:
        yield from (r.index_select(0, i) for i in index.split(step))


def _chunks64(r: torch.Tensor, buf: torch.Tensor | None) -> Iterator[torch.Tensor]:
    """Float64 copies of consecutive row chunks of ``r`` (n, d), written into ``buf`` (reused
    and overwritten) when given and on CPU; else one full float64 copy."""
    if buf is None or r.device.type != "cpu" or r.shape[0] <= buf.shape[0]:
        yield r.to(torch.float64, copy=True)
        return
    for chunk in r.split(buf.shape[0]):
        b = buf[: chunk.shape[0]]
        b.copy_(chunk)
        yield b


def mmr_sum(r: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over the rows of ``r`` (n, d) — or its rows ``index`` — of the Eq. 2 summand
    (:func:`outlierlab.metrics.token_mmr`), a float64 0-d tensor, chunk by chunk."""
    total = torch.zeros((), dtype=torch.float64, device=r.device)
    for c in _row_chunks(r, index):
        total += token_mmr(c).sum()
    return total


def offdiag_cosine_fast(r: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`outlierlab.metrics.offdiag_cosine` of the rows of ``r`` (or its rows ``index``) as
    the monitor's hook computes it: ``Σ_α u_α = Xᵀ(1/|x_α|)``, one matrix-vector product per
    chunk in float32 (float64 input stays float64), no unit-row copy; about 4× cheaper than the
    float64 form, relative error ~1e-7. A float64 0-d tensor; NaN for fewer than 2 rows."""
    n = r.shape[0] if index is None else index.shape[0]
    if n < 2:
        return torch.tensor(math.nan, dtype=torch.float64, device=r.device)
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    total = torch.zeros(r.shape[1], dtype=dt, device=r.device)
    nonzero = torch.zeros((), dtype=torch.int64, device=r.device)
    for c in _row_chunks(r, index):
        c = c.to(dt)
        n2 = c.square().sum(1)
        total += torch.where(n2 > 0, n2.rsqrt(), 0.0) @ c
        nonzero += (n2 > 0).sum()
    return (total.double().square().sum() - nonzero) / (n * (n - 1))


# -- the accumulator --------------------------------------------------------------------------


@dataclass(slots=True)
class LayerSums:
    """The sufficient statistics of one layer: named float64 views into one flat buffer (so
    merge, copy and all-reduce move everything in one op). Built by :meth:`over`."""

    sq: torch.Tensor  # (d,) Σ_α x_αj² — s_j² up to 1/n: Eq. 1, outlier neurons
    sq_centred: torch.Tensor  # (d,) Σ_α (x_αj − μ_α)², μ_α the token's mean: centred Kurt
    sum_centred: torch.Tensor  # (d,) Σ_α (x_αj − μ_α): the authors' batch_corr_mean
    tokens: torch.Tensor  # () n, non-padding tokens seen
    mmr_sum: torch.Tensor  # () Σ of the Eq. 2 summand over the MMR tokens
    mmr_tokens: torch.Tensor  # () tokens in mmr_sum (a subsample when bounded)
    excess_kurtosis_sum: torch.Tensor  # () Σ_α per-token excess kurtosis, clipped at 0
    above: torch.Tensor  # () entries with |x| > threshold
    cos_sum: torch.Tensor  # () Σ of recorded cosine-similarity values
    cos_count: torch.Tensor  # () values in cos_sum

    @classmethod
    def size(cls, d: int) -> int:
        """Length of the flat buffer for width d."""
        return _N_VECTORS * d + _N_SCALARS

    @classmethod
    def over(cls, flat: torch.Tensor, d: int) -> LayerSums:
        """Named views into ``flat`` (length :meth:`size` ``(d)``); writing them writes ``flat``."""
        vectors = [flat[i * d : (i + 1) * d] for i in range(_N_VECTORS)]
        scalars = [flat[_N_VECTORS * d + i] for i in range(_N_SCALARS)]
        return cls(*vectors, *scalars)


_N_VECTORS = 3  # the (d,) fields come first
_N_SCALARS = len(fields(LayerSums)) - _N_VECTORS  # then the 0-d ones


@dataclass(slots=True)
class _HostCounts:
    """Counts kept as Python ints until :meth:`StatsAccumulator._flush`, so ``update`` adds no
    tiny tensor ops for them."""

    tokens: int = 0
    mmr_tokens: int = 0
    cos_count: int = 0


class StatsAccumulator:
    """Streaming Eq. 1, Eq. 2 and friends (science §1) for one layer of width d, O(d) memory.

    Keeps the :class:`LayerSums` of all batches seen: per-neuron Σ x², the token count, Σ of
    per-token MMR, and a running sum/count of cosine-similarity values (:meth:`add_cos`, one
    value per measured forward, averaged); with ``extras`` (default) also per-neuron Σ of
    token-centred x² (centred kurtosis), Σ of per-token excess kurtosis and the count of
    |x| > ``threshold``. ``authors`` (implied by ``extras``) keeps the token-centred per-neuron
    Σc² and Σc for the authors' metrics (about 1.5× the cost of Σx² alone). ``update`` never
    calls ``.item()`` so it does not synchronise a GPU.
    """

    def __init__(
        self,
        d: int,
        device: torch.device | str = "cpu",
        threshold: float = LLM_INT8_THRESHOLD,
        extras: bool = True,
        authors: bool = False,
    ):
        if d < 1:
            raise ValueError(f"width d must be ≥ 1, got {d}")
        self.d, self.threshold, self.extras = d, threshold, extras
        self.authors = authors or extras
        self.state = torch.zeros(LayerSums.size(d), dtype=torch.float64, device=device)
        self.sums = LayerSums.over(self.state, d)
        self._pending = _HostCounts()
        self._buf: torch.Tensor | None = None  # scratch for _sum_sq64 (not state)

    @property
    def tokens(self) -> int:
        return int(self.sums.tokens) + self._pending.tokens

    def _flush(self) -> None:
        """Move the host-side counts into the state."""
        p, s = self._pending, self.sums
        if p.tokens:
            s.tokens += p.tokens
        if p.mmr_tokens:
            s.mmr_tokens += p.mmr_tokens
        if p.cos_count:
            s.cos_count += p.cos_count
        self._pending = _HostCounts()

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
        r = x.detach().reshape(-1, self.d)
        if mask is not None:
            r = r[mask.detach().reshape(-1).to(device=r.device, dtype=torch.bool)]
        n = r.shape[0]
        self._pending.tokens += n
        if not n:
            return self
        s = self.sums
        if mmr_index is None:
            mmr_rows = subsample_tokens(r, mmr_max_tokens, seed)
            s.mmr_sum += mmr_sum(mmr_rows)
            self._pending.mmr_tokens += mmr_rows.shape[0]
        else:
            s.mmr_sum += mmr_sum(r, mmr_index)
            self._pending.mmr_tokens += mmr_index.shape[0]
        if self.extras:
            self._add_extras(r)
        elif self.authors:
            self._add_centred(r)
        else:
            s.sq.add_(self._sum_sq64(r))
        return self

    def _add_centred(self, r: torch.Tensor) -> None:
        """Σx², Σc² and Σc (c the token-centred rows, see :meth:`_add_extras`) chunk by chunk
        through :meth:`scratch`: a row mean, a column sum and one float64 matrix-vector product
        per chunk beyond Σx² (few ops: each costs a dispatch)."""
        s = self.sums
        for b in _chunks64(r, self.scratch()):
            mu = b.mean(1)
            s.sum_centred.add_(b.sum(0).sub_(mu.sum()))
            cross = mu @ b  # Σ_α x_αj μ_α
            col_sq = b.square_().sum(0)
            s.sq.add_(col_sq)
            s.sq_centred.add_(col_sq.sub_(cross.mul_(2)).add_(mu.square().sum()))

    def _add_extras(self, r: torch.Tensor) -> None:
        """Σx² plus the centred sums of science §1's variants, from raw moments in one float64 pass
        of matrix-vector products: Σ_α (x_αj − μ_α)² = Σ_α x_αj² − 2 Σ_α x_αj μ_α + Σ_α μ_α², and
        the per-token central 4th moment c4 = m4 − 4μ m3 + 6μ² m2 − 3μ⁴ (excess kurtosis)."""
        s, d = self.sums, self.d
        r64 = r.to(torch.float64)
        sq = r64.square()
        col_sq = sq.sum(0)
        s.sq.add_(col_sq)
        w = torch.full((d,), 1.0 / d, dtype=torch.float64, device=r.device)
        mu, m2 = r64 @ w, sq @ w
        s.sq_centred.add_(col_sq - 2 * (r64.T @ mu) + mu.square().sum())
        s.sum_centred.add_(r64.sum(0) - mu.sum())
        m3, m4 = (sq * r64) @ w, sq.square() @ w
        var = m2 - mu.square()
        c4 = m4 - 4 * mu * m3 + 6 * mu.square() * m2 - 3 * mu.square().square()
        s.excess_kurtosis_sum += (c4 / var.square().clamp_min(_TINY) - 3.0).clamp_min(0.0).sum()
        s.above += (r.abs() > self.threshold).sum()

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
        s = self.sums
        if valid:
            s.cos_sum += value
            self._pending.cos_count += 1
            return
        v = torch.as_tensor(value, dtype=torch.float64, device=self.state.device)
        ok = ~torch.isnan(v)
        s.cos_sum += torch.where(ok, v, 0.0)
        s.cos_count += ok.double()

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
        """An independent accumulator with the same statistics."""
        new = StatsAccumulator(self.d, self.state.device, self.threshold, self.extras, self.authors)
        self._flush()
        new.state.copy_(self.state)
        return new

    def reset(self) -> None:
        """Forget all statistics."""
        self.state.zero_()
        self._pending = _HostCounts()

    def result(self, k: float = OUTLIER_K) -> dict:
        """``kurtosis`` (Eq. 1), ``mmr`` (Eq. 2), ``cos_sim``, ``outlier_neurons`` (indices,
        largest RMS first), ``tokens``; with ``authors`` (or ``extras``) also
        ``kurtosis_authors`` and ``corr_authors``; with ``extras`` also ``kurtosis_centred``,
        ``token_excess_kurtosis`` and ``share_above_6``. NaN where no data."""
        self._flush()
        s = LayerSums.over(self.state.cpu(), self.d)
        n, n_mmr, n_cos = int(s.tokens), float(s.mmr_tokens), float(s.cos_count)
        nan = math.nan
        out = {
            "kurtosis": kurtosis_from_sq(s.sq) if n else nan,
            "mmr": float(s.mmr_sum) / n_mmr if n_mmr else nan,
            "cos_sim": float(s.cos_sum) / n_cos if n_cos else nan,
            "outlier_neurons": outliers_from_sq(s.sq, k) if n else [],
            "tokens": n,
        }
        if self.authors:
            out["kurtosis_authors"] = kurtosis_authors_from_sums(s.sq_centred, n)
            out["corr_authors"] = corr_authors_from_sums(s.sum_centred, s.sq_centred, n)
        if self.extras:
            out["kurtosis_centred"] = (kurtosis_from_sq(s.sq_centred) - 1.0) if n else nan
            out["token_excess_kurtosis"] = float(s.excess_kurtosis_sum) / n if n else nan
            out[f"share_above_{self.threshold:g}"] = float(s.above) / (n * self.d) if n else nan
        return out
