"""The numba kernels behind :mod:`outlierlab.fused` (imported only through it: importing this
module imports numba). Compiled on first call and cached on disk (``cache=True``)."""

from __future__ import annotations

import numba
import numpy as np

_FASTMATH = {"reassoc", "contract", "nsz"}  # reorder sums, fuse multiply-adds; NaN, inf kept
_jit = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH)
_inline = numba.njit(cache=True, nogil=True, fastmath=_FASTMATH, inline="always")


@_inline
def _row_moments(row, d):
    """Σ_j x_j and Σ_j x_j² of one row, in float64."""
    s = 0.0
    q = 0.0
    for j in range(d):
        v = np.float64(row[j])
        s += v
        q += v * v
    return s, q


@_inline
def _cos_add(row, q, cos_acc, d):
    """cos_acc += x/|x| (q = |x|²); 1 if the row counts, 0 for a zero row (cosine 0 with every
    row). NaN and inf pass on into cos_acc, as in the torch path."""
    if q == 0.0:
        return 0
    w = cos_acc.dtype.type(1.0 / np.sqrt(q))
    for j in range(d):
        cos_acc[j] += row[j] * w
    return 1


@_jit
def point_sums(x, sums, cos_index, cos_all, cos_acc):
    """sums[0] += Σ_α x_α, sums[1] += Σ_α x_α μ_α, sums[2] += Σ_α x_α²; cos_acc += Σ x_α/|x_α|
    over the rows ``cos_index`` (every row with ``cos_all``). Returns the number of those rows
    that are not zero."""
    n, d = x.shape
    cos_flag = np.full(n, cos_all)
    for k in range(cos_index.shape[0]):
        cos_flag[cos_index[k]] = True
    col, cross, sq = sums[0], sums[1], sums[2]
    nonzero = 0
    i = 0
    while i + 1 < n:  # two rows at a time: half the loads and stores of the sums
        r0, r1 = x[i], x[i + 1]
        s0, q0 = _row_moments(r0, d)
        s1, q1 = _row_moments(r1, d)
        m0, m1 = s0 / d, s1 / d
        for j in range(d):
            a, b = np.float64(r0[j]), np.float64(r1[j])
            col[j] += a + b
            cross[j] += a * m0 + b * m1
            sq[j] += a * a + b * b
        if cos_flag[i]:
            nonzero += _cos_add(r0, q0, cos_acc, d)
        if cos_flag[i + 1]:
            nonzero += _cos_add(r1, q1, cos_acc, d)
        i += 2
    if i < n:
        r0 = x[i]
        s0, q0 = _row_moments(r0, d)
        m0 = s0 / d
        for j in range(d):
            a = np.float64(r0[j])
            col[j] += a
            cross[j] += a * m0
            sq[j] += a * a
        if cos_flag[i]:
            nonzero += _cos_add(r0, q0, cos_acc, d)
    return nonzero


@_jit
def gather_abs(x, index, out):
    """out[k] = |x[index[k]]|."""
    d = x.shape[1]
    for k in range(index.shape[0]):
        row, o = x[index[k]], out[k]
        for j in range(d):
            o[j] = abs(row[j])
