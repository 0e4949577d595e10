"""One-pass CPU kernels for the monitor (science §1 "Streaming", §1.7), compiled by numba.

A measured point's token rows X (n, d) feed Kurt, the authors' metrics, cos-sim and Eq. 2. With
torch and numpy ops that is about five passes over X: μ = X·(1/d), ``[1; μ]·X``, Σx², a gather of
the cos-sim rows with their norms and ``Xᵀ(1/|x_α|)``, and a gather of the Eq. 2 rows.
:func:`point_sums` does all but the Eq. 2 sort in one pass: per row, μ_α and |x_α|² while the row
is in L1, then Σ_α x_αj, Σ_α x_αj μ_α, Σ_α x_αj² into the float64 sums and, on the cos-sim rows,
Σ_α x_α/|x_α| in float32 (as :func:`outlierlab.stats.offdiag_cosine_fast`);
:func:`gather_abs` writes |x| of the Eq. 2 rows for numpy's sort. About 3× cheaper than the ops
at 2048 × 192 (benchmarks/RESULTS.md). :func:`causal_entropy_sum` gives a plain-softmax layer's
attention entropy (science §1.7) from its unmasked logits in one pass per causal row, about
2× cheaper than mask + softmax + entropy ops at 6 heads × 128 × 128.

Optional: numba comes with the ``fast`` extra. Without it, or with ``OUTLIERLAB_NUMBA=0``,
:mod:`outlierlab.stats` takes its torch/numpy path; both agree to float rounding (the kernel's
per-neuron sums are float64 throughout, so closer to exact). numba is imported, and the kernels
compiled (cached on disk), on the first measured CPU forward, never at start-up.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

ENV = "OUTLIERLAB_NUMBA"
_NO_ROWS = np.empty(0, dtype=np.int64)
_kernels: Any = None  # the compiled kernels' namespace; False when numba is absent or disabled


def available() -> bool:
    """Whether the kernels can run: numba importable and ``OUTLIERLAB_NUMBA`` not ``0``."""
    global _kernels
    if _kernels is None:
        _kernels = False if os.environ.get(ENV, "1") == "0" else _load()
    return _kernels is not False


def _require() -> Any:
    """The compiled kernels; RuntimeError when :func:`available` is false."""
    if not available():
        raise RuntimeError(f"the fused kernels need numba (the 'fast' extra) and {ENV} != 0")
    return _kernels


def _load() -> Any:
    try:
        return importlib.import_module("outlierlab._fused_kernels")  # imports numba
    except ImportError:
        return False


def point_sums(
    x: np.ndarray, sums: np.ndarray, cos_index: np.ndarray | None
) -> tuple[np.ndarray, int]:
    """Add Σ_α x_αj, Σ_α x_αj μ_α and Σ_α x_αj² of the C-contiguous float32/float64 rows ``x``
    (n, d) into ``sums`` (3, d) float64, in place (μ_α = Σ_j x_αj / d). Returns
    ``(Σ_α x_α/|x_α|, nonzero)`` over the rows ``cos_index`` (all rows when None): a (d,) vector
    in x's float type (float32 for float32 rows) and the number of those rows that are not zero,
    for :func:`outlierlab.metrics.offdiag_cosine`'s ``(|Σu|² − nonzero) / (m(m−1))``."""
    kernels = _require()
    _check(x, cos_index)
    if sums.shape != (3, x.shape[1]) or sums.dtype != np.float64:
        raise ValueError(f"sums must be float64 (3, {x.shape[1]}), got {sums.dtype} {sums.shape}")
    every = cos_index is None
    index = _NO_ROWS if every else cos_index
    acc = np.zeros(x.shape[1], dtype=x.dtype)
    nonzero = kernels.point_sums(x, sums, index, every, acc)
    return acc, int(nonzero)


def _check(x: np.ndarray, index: np.ndarray | None) -> None:
    """The kernels do not check bounds: refuse what would read or write past ``x``."""
    if x.ndim != 2 or not x.flags.c_contiguous:
        raise ValueError(f"x must be a C-contiguous (n, d) array, got shape {x.shape}")
    if index is not None and index.size and (index.min() < 0 or index.max() >= x.shape[0]):
        raise IndexError(f"row index out of range for {x.shape[0]} rows")


def gather_abs(x: np.ndarray, index: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """|x| of the rows ``index`` of the C-contiguous ``x`` (n, d), written into ``out``
    (len(index), d) (a fresh array when None) without a signed copy first."""
    kernels = _require()
    _check(x, index)
    if out is None:
        out = np.empty((index.shape[0], x.shape[1]), dtype=x.dtype)
    kernels.gather_abs(x, index, out)
    return out


def causal_entropy_sum(z: np.ndarray) -> tuple[float, int]:
    """``(Σ H, rows)``: the entropies, in nats, of the causal softmax rows of the C-contiguous
    float32 logits ``z`` (…, T_q, T_k) (query i sees keys j ≤ i + T_k − T_q; the rest of ``z``
    is not read) and how many rows that is. One pass per row, exp vectorised: H = log S −
    Σ_j e_j (z_j − m) / S with m the row's max, e_j = exp(z_j − m), S = Σ e_j (science §1,
    attention entropy); :func:`outlierlab.metrics.softmax_entropy_sum` of the masked softmax,
    to float32 rounding. NaN when a seen logit is NaN or ±inf."""
    kernels = _require()
    if z.dtype != np.float32 or z.ndim < 2 or not z.flags.c_contiguous:
        raise ValueError(f"z must be C-contiguous float32 (..., T_q, T_k), got {z.dtype} {z.shape}")
    t_q, t_k = z.shape[-2:]
    if t_k < t_q:
        raise ValueError(f"causal rows need T_k >= T_q, got T_q={t_q}, T_k={t_k}")
    rows = z.size // t_k if t_k else 0
    if not rows:
        return 0.0, 0
    gap, e = np.empty(t_k, dtype=np.float32), np.empty(t_k, dtype=np.float32)
    total = kernels.causal_entropy_sum(z.reshape(-1, t_q, t_k), gap, e, np.empty(t_k, np.int32))
    return float(total), rows
