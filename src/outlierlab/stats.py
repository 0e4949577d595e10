"""Streaming science §1 metrics: :class:`StatsAccumulator` and the chunked kernels of the hook.

science §1 "Streaming": Kurt (Eq. 1), MMR (Eq. 2) and the authors' ``kurtosis`` and
``batch_corr_mean`` (:func:`~outlierlab.metrics.kurtosis_authors`,
:func:`~outlierlab.metrics.corr_authors`) need only per-neuron sums over tokens, so a
layer's statistics fit in O(d) float64 numbers (:class:`LayerSums`) that can be added batch by
batch, merged, and all-reduced over ``torch.distributed`` ranks. :meth:`StatsAccumulator.result`
turns them into the formulas of :mod:`outlierlab.metrics` and equals the one-shot functions on
the union of the batches (up to float64 rounding of the summation order).

On CPU the kernels work in row chunks (``_CHUNK`` elements) so a huge batch never makes a
float64 copy of itself; elsewhere they take all rows at once. The per-neuron sums of a CPU
batch that is not float64 are summed in float32 over chunks of at most ``_F32_ROWS`` tokens
(error bound ``F32_SUM_RTOL``) and added to the float64 state, about 2.5× cheaper than a
float64 copy; float64 input and other devices sum in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, fields

import numpy as np
import torch

from outlierlab import fused
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

_SCRATCH = 1 << 18  # float64 elements of a CPU scratch chunk (2 MiB: one chunk for 2048 × 128)
_F32_ROWS = 2048  # tokens per chunk of a CPU batch's float32 partial sums (bounds their error)
F32_SUM_RTOL = 1e-5
"""Error the float32 partial sums of a CPU batch may add to a per-neuron sum, relative to the
sum of its terms' magnitudes (Σ_α |x_αj μ_α| for Σxμ; plain relative error for Σx²): float32
rounding (6e-8 per add, μ itself rounded) over at most ``_F32_ROWS`` tokens per chunk; seen:
2e-6 on hard data, ~1e-8 on Kurt and the authors' metrics (tests/unit/test_metrics_stream.py)."""
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
    if buf is None or r.device.type != "cpu":
        yield r.to(torch.float64, copy=True)
        return
    for chunk in r.split(buf.shape[0]):  # one chunk when it fits: no fresh allocation
        b = buf[: chunk.shape[0]]
        b.copy_(chunk)
        yield b


def mmr_sum(r: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """Σ over the rows of ``r`` (n, d) — or its rows ``index`` — of the Eq. 2 summand
    (:func:`outlierlab.metrics.token_mmr`), a float64 0-d tensor, chunk by chunk."""
    if _numpy_ok(r):
        rows = r if index is None else r.index_select(0, index)
        return torch.tensor(mmr_sum_host(rows), dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float64, device=r.device)
    for c in _row_chunks(r, index):
        total += token_mmr(c).sum()
    return total


def _sums_in_f32(r: torch.Tensor) -> bool:
    """Whether the per-neuron sums of ``r`` are taken in float32 chunks (module docstring)."""
    return r.device.type == "cpu" and r.dtype != torch.float64


def _numpy_ok(r: torch.Tensor) -> bool:
    """Whether ``r`` can be read as a numpy array without a copy of another dtype."""
    return r.device.type == "cpu" and r.dtype in (torch.float32, torch.float64)


def mmr_sum_host(r: torch.Tensor) -> float:
    """:func:`mmr_sum` of a CPU float32/float64 ``r`` (n, d) as a Python float, in numpy: one
    (SIMD) sort of |x| per row gives the max (last column) and the median (the middle one or
    two, averaged in float64 as :func:`outlierlab.metrics.median_abs`), so no torch op is
    dispatched. Equals :func:`mmr_sum` up to the summation order."""
    total = 0.0
    for c in _row_chunks(r):
        p = np.abs(c.detach().numpy())
        total += _mmr_sum_abs(p)
    return total


def _mmr_sum_abs(p: np.ndarray) -> float:
    """Σ over the rows of ``p`` = |x| (n, d), sorted in place here, of max / median (Eq. 2)."""
    d = p.shape[-1]
    lo, hi = (d - 1) // 2, d // 2
    p.sort(axis=-1)
    med = (p[:, lo].astype(np.float64) + p[:, hi].astype(np.float64)) / 2
    with np.errstate(divide="ignore", invalid="ignore"):  # inf / NaN as token_mmr's
        return float((p[:, -1].astype(np.float64) / med).sum())


def _cosine_from_unit_sum(t: np.ndarray, nonzero: int, n: int) -> float:
    """Mean off-diagonal cosine of n rows from t = Σ_α x_α/|x_α| and the number of non-zero
    rows: (|t|² − nonzero) / (n(n−1)) (science §1)."""
    t = t.astype(np.float64)
    return float((t @ t - nonzero) / (n * (n - 1)))


def offdiag_cosine_fast(r: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`outlierlab.metrics.offdiag_cosine` of the rows of ``r`` (or its rows ``index``) as
    the monitor's hook computes it: ``Σ_α u_α = Xᵀ(1/|x_α|)``, one matrix-vector product per
    chunk in float32 (float64 input stays float64), no unit-row copy; about 4× cheaper than the
    float64 form, relative error ~1e-7. A float64 0-d tensor; NaN for fewer than 2 rows."""
    n = r.shape[0] if index is None else index.shape[0]
    if n < 2:
        return torch.tensor(math.nan, dtype=torch.float64, device=r.device)
    dt = torch.float64 if r.dtype == torch.float64 else torch.float32
    total: torch.Tensor | None = None
    nonzero: torch.Tensor | int = 0
    for c in _row_chunks(r, index):
        c = c.to(dt)
        w = _inverse_norms(c)
        nonzero = nonzero + torch.count_nonzero(w)
        total = w @ c if total is None else total.addmv_(c.T, w)
    assert total is not None
    t64 = total.double()
    return (t64.dot(t64) - nonzero) / (n * (n - 1))


def _inverse_norms(c: torch.Tensor) -> torch.Tensor:
    """1/|x_α| per row of ``c``; zero rows weigh 0 (cosine 0 with every row)."""
    return torch.linalg.vector_norm(c, dim=1).reciprocal_().nan_to_num_(posinf=0.0)


def offdiag_cosine_host(r: torch.Tensor) -> float:
    """:func:`offdiag_cosine_fast` of a CPU float32/float64 ``r`` (n ≥ 2, d) in one chunk, as a
    Python float: the two passes over the rows in torch, the scalar tail in numpy (no 0-d
    torch ops)."""
    w = _inverse_norms(r)
    return _cosine_from_unit_sum((w @ r).numpy(), np.count_nonzero(w.numpy()), r.shape[0])


# -- the accumulator --------------------------------------------------------------------------


@dataclass(slots=True)
class LayerSums:
    """The sufficient statistics of one layer: named float64 views into one flat buffer (so
    merge, copy and all-reduce move everything in one op). Built by :meth:`over`.

    Only raw sums are kept (``col_sum`` and ``cross`` adjacent, so one matrix product updates
    both); the token-centred sums of the authors' metrics follow when read
    (:meth:`sum_centred`, :meth:`sq_centred`), with μ_α the mean of token α over the width:
    Σ_α μ_α = Σ_j col_sum_j / d and Σ_α μ_α² = Σ_j cross_j / d."""

    col_sum: torch.Tensor  # (d,) Σ_α x_αj
    cross: torch.Tensor  # (d,) Σ_α x_αj μ_α
    sq: torch.Tensor  # (d,) Σ_α x_αj² — s_j² up to 1/n: Eq. 1, outlier neurons
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

    def sum_centred(self) -> torch.Tensor:
        """(d,) Σ_α (x_αj − μ_α): the authors' ``batch_corr_mean``."""
        return self.col_sum - self.col_sum.sum() / self.col_sum.numel()

    def sq_centred(self) -> torch.Tensor:
        """(d,) Σ_α (x_αj − μ_α)² = Σ x² − 2 Σ x μ + Σ μ²: centred Kurt, the authors' metrics."""
        return self.sq - 2 * self.cross + self.cross.sum() / self.cross.numel()


_N_VECTORS = 3  # the (d,) fields come first
_N_SCALARS = len(fields(LayerSums)) - _N_VECTORS  # then the 0-d ones
_SLOT = {f.name: i - _N_VECTORS for i, f in enumerate(fields(LayerSums)) if i >= _N_VECTORS}


@dataclass(slots=True)
class _HostCounts:
    """Counts (and, on CPU, the Eq. 2 sum) kept as Python numbers until
    :meth:`StatsAccumulator._flush`, so ``update`` adds no tiny tensor ops for them."""

    tokens: int = 0
    mmr_tokens: int = 0
    cos_count: int = 0
    mmr_sum: float = 0.0
    cos_sum: float = 0.0


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
        self._pair = self.state[: 2 * d].view(2, d)  # col_sum and cross, one matrix
        self._buf: torch.Tensor | None = None  # scratch for the chunked sums (not state)
        self._ones: torch.Tensor | None = None  # _lhs (not state)
        self._w: torch.Tensor | None = None  # _mean_w (not state)
        self._part32: torch.Tensor | None = None  # _add_f32's (3, d) partial sums
        self._sums3 = self.state[: 3 * d]  # col_sum, cross, sq: one add of (3, d) partial sums
        self._abs: np.ndarray | None = None  # _add_point_fused's |x| of the Eq. 2 rows

    @property
    def tokens(self) -> int:
        return int(self.sums.tokens) + self._pending.tokens

    def _flush(self) -> None:
        """Move the host-side counts into the state."""
        p, s = self._pending, self.sums
        if self.state.device.type == "cpu":  # one in-place numpy write, no torch ops
            at = _N_VECTORS * self.d
            st = self.state.detach().numpy()
            st[at + _SLOT["tokens"]] += p.tokens
            st[at + _SLOT["mmr_tokens"]] += p.mmr_tokens
            st[at + _SLOT["cos_count"]] += p.cos_count
            st[at + _SLOT["mmr_sum"]] += p.mmr_sum
            st[at + _SLOT["cos_sum"]] += p.cos_sum
            self._pending = _HostCounts()
            return
        if p.tokens:
            s.tokens += p.tokens
        if p.mmr_tokens:
            s.mmr_tokens += p.mmr_tokens
        if p.cos_count:
            s.cos_count += p.cos_count
        if p.mmr_sum:
            s.mmr_sum += p.mmr_sum
        if p.cos_sum:
            s.cos_sum += p.cos_sum
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
        if not r.shape[0]:
            return self
        if mmr_index is None:
            self.add_mmr(subsample_tokens(r, mmr_max_tokens, seed))
        else:
            self.add_mmr(r.index_select(0, mmr_index))
        return self.add_rows(r)

    def add_rows(self, r: torch.Tensor) -> StatsAccumulator:
        """Add the token rows ``r`` (n, d) to every per-neuron sum (all but Eq. 2 and cos-sim,
        see :meth:`add_mmr`, :meth:`add_cos`)."""
        n = r.shape[0]
        self._pending.tokens += n
        if not n:
            return self
        if self.extras:
            self._add_extras(r)
        elif _sums_in_f32(r):
            self._add_f32(r, centred=self.authors)
        elif self.authors:
            self._add_centred(r)
        else:
            self._add_sq(r)
        return self

    def add_point(
        self,
        r: torch.Tensor,
        order: torch.Tensor | None = None,
        mmr_n: int | None = None,
        cos_n: int | None = None,
    ) -> StatsAccumulator:
        """One forward's token rows ``r`` (n, d) at a measured point: every per-neuron sum
        (:meth:`add_rows`), Eq. 2 (:meth:`add_mmr`) and, with n ≥ 2, one cos-sim value
        (:meth:`add_cos_rows`). When n exceeds ``mmr_n`` (``cos_n``), Eq. 2 (cos-sim) takes the
        rows ``order[:mmr_n]`` (``order[:cos_n]``) of the permutation ``order``, else all rows;
        one gather serves both. A CPU float32/float64 batch of at most ``_CHUNK`` elements goes
        through :mod:`outlierlab.fused` (one pass over the rows) when numba is there."""
        n = r.shape[0]
        sub_mmr = mmr_n is not None and n > mmr_n
        sub_cos = cos_n is not None and n > cos_n
        if (sub_mmr or sub_cos) and order is None:
            raise ValueError("add_point: a subsample (n > mmr_n or cos_n) needs the order")
        if n and self._fusable(r):
            self._add_point_fused(r, order, mmr_n if sub_mmr else None, cos_n if sub_cos else None)
            return self
        self.add_rows(r)
        if not n:
            return self
        k = max(mmr_n if sub_mmr else 0, cos_n if sub_cos else 0)
        sel = r.index_select(0, order[:k]) if k and k * r.shape[1] <= _CHUNK else None
        if sub_mmr:
            self.add_mmr(sel[:mmr_n] if sel is not None else r.index_select(0, order[:mmr_n]))
        else:
            self.add_mmr(r)
        if n >= 2:
            if not sub_cos:
                self.add_cos_rows(r)
            elif sel is not None:
                self.add_cos_rows(sel[:cos_n])
            else:
                self.add_cos_rows(r, order[:cos_n])
        return self

    def _fusable(self, r: torch.Tensor) -> bool:
        """Whether :meth:`add_point` can take the fused one-pass kernels for ``r``."""
        return (
            self.authors and not self.extras and self.state.device.type == "cpu"
            and _numpy_ok(r) and r.numel() <= _CHUNK and r.is_contiguous() and fused.available()
        )  # fmt: skip

    def _add_point_fused(
        self, r: torch.Tensor, order: torch.Tensor | None, mmr_n: int | None, cos_n: int | None
    ) -> None:
        """:meth:`add_point` through :func:`outlierlab.fused.point_sums` (the per-neuron sums
        straight into the float64 state, the cos-sim rows' Σ x/|x|) and
        :func:`outlierlab.fused.gather_abs` (|x| of the Eq. 2 rows, sorted in numpy)."""
        n, d = r.shape
        x = r.detach().numpy()
        p = self._pending
        p.tokens += n
        if n < 2:
            cos_index = np.empty(0, dtype=np.int64)
        else:
            cos_index = None if cos_n is None else order[:cos_n].numpy()
        t, nonzero = fused.point_sums(x, self._sums3.numpy().reshape(3, d), cos_index)
        if n >= 2:
            p.cos_sum += _cosine_from_unit_sum(t, nonzero, n if cos_n is None else cos_n)
            p.cos_count += 1
        if mmr_n is None:
            p.mmr_sum += _mmr_sum_abs(np.abs(x))
            p.mmr_tokens += n
            return
        buf = self._abs
        if buf is None or buf.shape[0] < mmr_n or buf.dtype != x.dtype:
            buf = self._abs = np.empty((mmr_n, d), dtype=x.dtype)
        p.mmr_sum += _mmr_sum_abs(fused.gather_abs(x, order[:mmr_n].numpy(), buf[:mmr_n]))
        p.mmr_tokens += mmr_n

    def add_mmr(self, rows: torch.Tensor) -> StatsAccumulator:
        """Add the Eq. 2 summands of the token rows ``rows`` (n, d): on CPU in numpy
        (:func:`mmr_sum_host`, a host float until read), elsewhere on the device."""
        if not rows.shape[0]:
            return self
        self._pending.mmr_tokens += rows.shape[0]
        if _numpy_ok(rows) and self.state.device.type == "cpu":
            self._pending.mmr_sum += mmr_sum_host(rows)
        else:
            self.sums.mmr_sum.add_(mmr_sum(rows))
        return self

    def add_cos_rows(self, rows: torch.Tensor, index: torch.Tensor | None = None) -> None:
        """Record the mean off-diagonal cosine similarity of the token rows ``rows`` (or its
        rows ``index``; at least 2) as one value (:func:`offdiag_cosine_fast`): a CPU
        float32/float64 batch in one chunk as a host float until read (as the Eq. 2 sum),
        elsewhere on the device."""
        if (index is None and _numpy_ok(rows) and rows.numel() <= _CHUNK
                and self.state.device.type == "cpu"):  # fmt: skip
            self._pending.cos_sum += offdiag_cosine_host(rows)
        else:
            self.sums.cos_sum += offdiag_cosine_fast(rows, index)
        self._pending.cos_count += 1

    def _lhs(self, m: int, device: torch.device,
             dtype: torch.dtype = torch.float64) -> torch.Tensor:  # fmt: skip
        """A reused (2, m) matrix: row 0 ones, row 1 free (the token means)."""
        buf = self._ones
        if buf is None or buf.shape[1] < m or buf.device != device or buf.dtype != dtype:
            buf = torch.ones(2, max(m, 1), dtype=dtype, device=device)
            self._ones = buf
        return buf[:, :m]

    def _mean_w(self, device: torch.device, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The reused (d,) vector 1/d: ``X @ w`` is the token means."""
        w = self._w
        if w is None or w.device != device or w.dtype != dtype:
            w = self._w = torch.full((self.d,), 1.0 / self.d, dtype=dtype, device=device)
        return w

    def _add_centred(self, r: torch.Tensor) -> None:
        """Σx, Σxμ and Σx² (the authors' centred sums follow when read:
        :meth:`LayerSums.sq_centred`), chunk by chunk through :meth:`scratch` in five ops per
        chunk: a float64 copy, the token means μ, one matrix product ``[1; μ] · X`` into
        ``col_sum`` and ``cross``, a square and one matrix-vector product into ``sq``."""
        s, pair = self.sums, self._pair
        for b in _chunks64(r, self.scratch()):
            lhs = self._lhs(b.shape[0], b.device)
            torch.mv(b, self._mean_w(b.device), out=lhs[1])  # μ_α (a gemv beats mean(1))
            pair.addmm_(lhs, b)
            s.sq.addmv_(b.square_().T, lhs[0])

    def _add_f32(self, r: torch.Tensor, centred: bool) -> None:
        """:meth:`_add_centred` (``centred``) or :meth:`_add_sq` of a CPU batch that is not
        float64 (module docstring): per chunk of at most ``_F32_ROWS`` tokens, μ = X·(1/d) and
        ``[1; μ] · X`` in one float32 (2, d) product, Σx² as numpy's one-pass ``einsum`` of X
        with itself (no squared copy), then one float64 add of the (3, d) partial sums into
        ``col_sum, cross, sq`` (adjacent in the state). Every op writes a reused buffer: no
        allocation per forward."""
        f32 = torch.float32
        if self._part32 is None:
            self._part32 = torch.zeros(3, self.d)
        part = self._part32
        for c in (r,) if r.shape[0] <= _F32_ROWS else r.split(_F32_ROWS):
            if c.dtype != f32:
                c = c.float()
            if centred:
                lhs = self._lhs(c.shape[0], c.device, f32)
                torch.mv(c, self._mean_w(c.device, f32), out=lhs[1])  # μ_α
                torch.mm(lhs, c, out=part[:2])
            a = c.detach().numpy()
            np.einsum("ij,ij->j", a, a, out=part[2].numpy())  # Σ_α x_αj² in one pass
            if centred:
                self._sums3.add_(part.view(-1))
            else:
                self.sums.sq.add_(part[2])

    def _add_sq(self, r: torch.Tensor) -> None:
        """Σx² alone, chunk by chunk (as :meth:`_add_centred`)."""
        s = self.sums
        for b in _chunks64(r, self.scratch()):
            s.sq.addmv_(b.square_().T, self._lhs(b.shape[0], b.device)[0])

    def _add_extras(self, r: torch.Tensor) -> None:
        """Σx², Σx, Σxμ plus the variants of science §1, from raw moments in one float64 pass
        of matrix-vector products: the per-token central 4th moment
        c4 = m4 − 4μ m3 + 6μ² m2 − 3μ⁴ (excess kurtosis)."""
        s = self.sums
        r64 = r.to(torch.float64)
        sq = r64.square()
        s.sq.add_(sq.sum(0))
        w = self._mean_w(r.device)
        mu, m2 = r64 @ w, sq @ w
        s.cross.add_(r64.T @ mu)
        s.col_sum.add_(r64.sum(0))
        m3, m4 = (sq * r64) @ w, sq.square() @ w
        var = m2 - mu.square()
        c4 = m4 - 4 * mu * m3 + 6 * mu.square() * m2 - 3 * mu.square().square()
        s.excess_kurtosis_sum += (c4 / var.square().clamp_min(_TINY) - 3.0).clamp_min(0.0).sum()
        s.above += (r.abs() > self.threshold).sum()

    def scratch(self) -> torch.Tensor | None:
        """A reused (rows, d) float64 buffer of about 2 MiB (``_SCRATCH`` elements) for
        chunked CPU sums."""
        if self.state.device.type != "cpu":
            return None
        if self._buf is None:
            self._buf = torch.empty(max(1, _SCRATCH // self.d), self.d, dtype=torch.float64)
        return self._buf

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
        ``token_excess_kurtosis`` and ``share_above_6``. NaN where no data. The formulas of
        :mod:`outlierlab.metrics` (``*_from_sq``, ``*_from_sums``), in numpy on one host copy
        of the state (the metrics' formulas read numpy arrays: a few µs each, no torch dispatch)."""
        self._flush()
        st = self.state.detach().cpu().numpy()
        d = self.d
        col_sum, cross, sq = st[:d], st[d : 2 * d], st[2 * d : 3 * d]
        tokens, mmr, n_mmr, excess, above, cos, n_cos = st[3 * d :].tolist()
        n, nan = int(tokens), math.nan
        out = {
            "kurtosis": kurtosis_from_sq(sq) if n else nan,
            "mmr": mmr / n_mmr if n_mmr else nan,
            "cos_sim": cos / n_cos if n_cos else nan,
            "outlier_neurons": outliers_from_sq(sq, k) if n else [],
            "tokens": n,
        }
        if self.authors or self.extras:
            sq_centred = sq - 2 * cross + cross.sum() / d  # LayerSums.sq_centred
        if self.authors:
            sum_centred = col_sum - col_sum.sum() / d  # LayerSums.sum_centred
            out["kurtosis_authors"] = kurtosis_authors_from_sums(sq_centred, n)
            out["corr_authors"] = corr_authors_from_sums(sum_centred, sq_centred, n)
        if self.extras:
            out["kurtosis_centred"] = (kurtosis_from_sq(sq_centred) - 1.0) if n else nan
            out["token_excess_kurtosis"] = excess / n if n else nan
            out[f"share_above_{self.threshold:g}"] = above / (n * d) if n else nan
        return out

