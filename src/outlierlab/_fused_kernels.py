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


# exp for float32 without a libm call, so that LLVM vectorises the loop: 2^n · p(r) with
# n = round(x / ln 2), r = x − n ln 2 (ln 2 in two parts), p Cephes' expf polynomial (~1 ulp);
# x ≥ _EXP_LO keeps 2^n a normal number.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_LO = np.float32(-87.0)
_EXP_P = tuple(np.float32(c) for c in (
    1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
    5.0000001201e-1,
))  # fmt: skip


@_jit
def causal_entropy_sum(z, gap, e, n_pow):
    """Σ over the causal rows of ``z`` (R, T_q, T_k) float32 logits (query i sees keys
    j ≤ i + T_k − T_q) of the entropy of softmax(row), H = log S − Σ e_j g_j / S with
    g_j = z_j − max, e_j = exp(g_j), S = Σ e_j. NaN when a row holds NaN or ±inf. ``gap``,
    ``e`` (float32) and ``n_pow`` (int32) are scratch of length T_k."""
    r_len, t_q, t_k = z.shape
    bits = e.view(np.int32)
    p0, p1, p2, p3, p4, p5 = _EXP_P
    total = 0.0
    for a in range(r_len):
        for i in range(t_q):
            n = i + 1 + t_k - t_q
            row = z[a, i]
            m = row[0]
            bad = np.float32(0.0)
            for j in range(n):
                m = max(m, row[j])
                bad += row[j] * np.float32(0.0)  # NaN for NaN or ±inf, else 0
            for j in range(n):
                x = max(row[j] - m, _EXP_LO)
                gap[j] = x
                k = np.floor(x * _LOG2E + np.float32(0.5))
                r = x - k * _LN2_HI - k * _LN2_LO
                p = ((((p0 * r + p1) * r + p2) * r + p3) * r + p4) * r + p5
                e[j] = p * r * r + r + np.float32(1.0)
                n_pow[j] = np.int32(k)
            for j in range(n):
                bits[j] += n_pow[j] << 23  # × 2^k: add k to the exponent field
            s = np.float32(0.0)
            w = np.float32(0.0)
            for j in range(n):
                s += e[j]
                w += e[j] * gap[j]
            total += np.log(np.float64(s)) - np.float64(w) / np.float64(s) + np.float64(bad)
    return total
