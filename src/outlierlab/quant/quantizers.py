"""Uniform fake quantisation (quantise then dequantise, round to nearest), science §4.

Every function maps a float tensor to the float tensor a b-bit integer kernel would see:

    q(x) = (clamp(round(x / scale) + z, qmin, qmax) - z) · scale

``round`` is round-half-to-even (``torch.round``). Two integer grids:

- symmetric (z = 0): the *restricted* range qmin = -(2^(b-1) - 1), qmax = 2^(b-1) - 1, so the
  grid is symmetric about 0 (int8: [-127, 127]; -128 is never used), scale = max|x| / qmax;
- asymmetric: qmin = 0, qmax = 2^b - 1, scale = (max - min) / (2^b - 1),
  z = clamp(round(-min / scale), 0, 2^b - 1); the range is first widened to contain 0 so that
  0 is exactly representable (padding and ReLU zeros stay zero).

Inside the range, |x - q(x)| ≤ scale / 2; outside it, x is clipped to the nearest end.
Granularity is chosen by the shape of the range tensors: a scalar (per tensor), one value per
output channel (weights, dim 0) or one per token (activations, every row over the last dim).
"""

from __future__ import annotations

import functools

import torch

EPS = 1e-12  # smallest scale: an all-zero tensor quantises to zeros instead of NaN
MSE_SAMPLES = 1 << 16  # values a per-tensor MSE range search evaluates its error on


def qrange(bits: int, symmetric: bool) -> tuple[int, int]:
    """Integer range (qmin, qmax): symmetric -(2^(b-1)-1)..2^(b-1)-1, asymmetric 0..2^b-1."""
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        return -qmax, qmax
    return 0, 2**bits - 1


def scale_zero_point(
    lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for the range [lo, hi] (tensors of any matching shape).

    symmetric: scale = max(|lo|, |hi|) / (2^(b-1) - 1), z = 0;
    asymmetric: lo ← min(lo, 0), hi ← max(hi, 0), scale = (hi - lo) / (2^b - 1),
    z = clamp(round(-lo / scale), 0, 2^b - 1).
    """
    qmin, qmax = qrange(bits, symmetric)
    if symmetric:
        scale = (torch.maximum(lo.abs(), hi.abs()) / qmax).clamp_min(EPS)
        return scale, torch.zeros_like(scale)
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(EPS)
    zero = torch.round(-lo / scale).clamp(qmin, qmax)
    return scale, zero


def fake_quant(
    x: torch.Tensor,
    scale: torch.Tensor | float,
    zero: torch.Tensor | float,
    bits: int,
    symmetric: bool,
) -> torch.Tensor:
    """q(x) = (clamp(round(x/scale) + z, qmin, qmax) - z) · scale, broadcasting scale and z.

    Computed as clamp(round(x/scale), qmin - z, qmax - z) · scale (identical, z being an
    integer): three element-wise passes on one new tensor, in place.
    """
    qmin, qmax = qrange(bits, symmetric)
    q = x.div(scale).round_()
    if symmetric:
        return q.clamp_(qmin, qmax).mul_(scale)
    if isinstance(zero, torch.Tensor) and zero.dim() > 0:
        return q.clamp_(qmin - zero, qmax - zero).mul_(scale)
    z = float(zero)
    return q.clamp_(qmin - z, qmax - z).mul_(scale)


def minmax_range(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of x: ``tensor`` (scalars), ``channel`` (per row of dim 0, shape (C, 1, ...))
    or ``token`` (per row over the last dim, shape (..., 1))."""
    if granularity == "tensor":
        return x.min(), x.max()
    if granularity == "channel":
        flat = x.reshape(x.shape[0], -1)
        shape = (x.shape[0],) + (1,) * (x.dim() - 1)
        return flat.amin(1).reshape(shape), flat.amax(1).reshape(shape)
    if granularity == "token":
        return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    raise ValueError(f"unknown granularity {granularity!r}")


def quantize_dynamic(
    x: torch.Tensor, bits: int, symmetric: bool, granularity: str = "token"
) -> torch.Tensor:
    """Fake-quantise x with ranges taken from x itself (min-max); per token by default.

    Symmetric per token: scale_α = max_j |x_{α,j}| / (2^(b-1) - 1) for every row α, max|x| from
    one ``aminmax`` pass (no |x| copy). Not torch's fused fake-quant kernels: they multiply by
    1/scale, and the rare values that then round the other way moved SmolLM2's perplexity by
    0.2 % (docs/real-models.md); this is bit-identical to the formula.
    """
    if symmetric:
        if granularity == "token":
            lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
        else:
            lo, hi = minmax_range(x, granularity)
        amax = torch.maximum(lo.abs_(), hi.abs_())
        scale = (amax / qrange(bits, True)[1]).clamp_min_(EPS)
        return fake_quant(x, scale, scale.new_zeros(()), bits, True)
    lo, hi = minmax_range(x, granularity)
    scale, zero = scale_zero_point(lo, hi, bits, False)
    return fake_quant(x, scale, zero, bits, False)


MSE_CHUNK = 1 << 20  # values (ratios × rows) per step of the MSE search: cache-sized tensors


@functools.lru_cache(maxsize=64)
def _sample_index(numel: int) -> torch.Tensor:
    """The fixed subsample (seed 0) a per-tensor MSE search measures its error on; cached by
    size (every weight of one shape uses the same indices, drawn once)."""
    g = torch.Generator().manual_seed(0)
    return torch.randperm(numel, generator=g)[:MSE_SAMPLES]


def mse_rows(w: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, lo, hi): the values an MSE range search measures its error on, (C, N) (per tensor
    C = 1: at most ``MSE_SAMPLES`` values drawn without replacement, plus the min and max), and
    the min-max range of ``w`` (:func:`minmax_range`)."""
    lo, hi = minmax_range(w, granularity)
    if granularity != "tensor":
        return w.reshape(w.shape[0], -1), lo, hi
    flat = w.reshape(-1)
    if flat.numel() > MSE_SAMPLES:
        idx = _sample_index(flat.numel()).to(flat.device)
        flat = torch.cat([flat[idx], lo.reshape(1), hi.reshape(1)])
    return flat.reshape(1, -1), lo, hi


def mse_range(
    w: torch.Tensor,
    bits: int,
    symmetric: bool,
    granularity: str,
    ratios: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MSE range search: the clipped range r·[min, max] minimising ‖w - q_r(w)‖² (per tensor or
    per output channel), r over a grid of clipping ratios (default 0.20, 0.21, ..., 1.00).

    Returns (lo, hi) of the best r (the smallest r on ties); with r = 1 in the grid the result
    is never worse than min-max. All ratios and channels are evaluated by batched tensor ops,
    in chunks of ``MSE_CHUNK`` values; the error is measured in grid units,
    s_r² · Σ (clamp(round(w/s_r), qmin - z, qmax - z) - w/s_r)², which is ‖w - q_r(w)‖² in five
    element-wise passes instead of seven (per tensor, on a random subsample of ``MSE_SAMPLES``
    values, :func:`mse_rows`).
    """
    if ratios is None:
        ratios = torch.linspace(0.2, 1.0, 81, dtype=torch.float64)
    rows, lo, hi = mse_rows(w, granularity)
    lo2, hi2 = lo.reshape(-1, 1), hi.reshape(-1, 1)  # (C, 1)
    r_all = ratios.to(device=w.device, dtype=w.dtype)
    qmin, qmax = qrange(bits, symmetric)
    chunk = max(1, MSE_CHUNK // rows.numel())
    errs = []
    for i in range(0, r_all.numel(), chunk):
        r = r_all[i : i + chunk].reshape(-1, 1, 1)  # (R, 1, 1)
        scale, zero = scale_zero_point(lo2 * r, hi2 * r, bits, symmetric)  # (R, C, 1)
        u = rows.unsqueeze(0) / scale  # (R, C, N), in grid units
        e = u.round()
        e = e.clamp_(qmin, qmax) if symmetric else e.clamp_(qmin - zero, qmax - zero)
        errs.append(e.sub_(u).square_().sum(-1) * scale.squeeze(-1).square())  # (R, C)
    best = r_all[torch.cat(errs).argmin(0)]  # (C,)
    return lo * best.reshape(lo.shape), hi * best.reshape(hi.shape)


def quantize_weight(
    w: torch.Tensor, bits: int, symmetric: bool, granularity: str, method: str
) -> torch.Tensor:
    """Fake-quantise a weight (out, in): per ``tensor`` or per output ``channel``, range by
    ``minmax`` or ``mse`` search (:func:`mse_range`)."""
    if method == "mse":
        lo, hi = mse_range(w, bits, symmetric, granularity)
    elif method == "minmax":
        lo, hi = minmax_range(w, granularity)
    else:
        raise ValueError(f"unknown range method {method!r}")
    scale, zero = scale_zero_point(lo, hi, bits, symmetric)
    return fake_quant(w, scale, zero, bits, symmetric)


def percentile_range(
    x: torch.Tensor, percentile: float, max_samples: int = 1 << 18, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi) = the (100 - p)-th and p-th percentiles of x (p = 99.999, say), computed with
    ``torch.quantile`` on at most ``max_samples`` values drawn uniformly without replacement."""
    flat = x.detach().reshape(-1)
    flat = flat if flat.is_floating_point() else flat.float()
    if flat.numel() > max_samples:
        g = torch.Generator().manual_seed(seed)
        flat = flat[torch.randperm(flat.numel(), generator=g)[:max_samples].to(flat.device)]
    q = torch.tensor(
        [1.0 - percentile / 100.0, percentile / 100.0], device=flat.device, dtype=flat.dtype
    )
    lo, hi = torch.quantile(flat, q)
    return lo, hi


def sqnr_db(signal_power: float, noise_power: float) -> float:
    """Signal-to-quantisation-noise ratio 10·log10(Σx² / Σ(x - q(x))²) in dB (inf if exact)."""
    if noise_power <= 0.0:
        return float("inf")
    if signal_power <= 0.0:
        return float("-inf")
    return 10.0 * float(torch.log10(torch.tensor(signal_power / noise_power, dtype=torch.float64)))


# --- FP8 E4M3 (Micikevicius et al. 2022, "FP8 Formats for Deep Learning") ----------------------

FP8_MAX = 448.0  # largest finite E4M3 value: 1.75 · 2^8 (the fn variant has no infinities)


def fp8_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to the E4M3 grid (1 sign, 4 exponent bits with bias 7, 3 mantissa bits,
    subnormals down to 2^-9), round half to even, saturating at ±448: clamp, cast to
    ``torch.float8_e4m3fn`` and back (an unclamped cast would give NaN above 464)."""
    return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(x.dtype)


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """s = max|x| / 448 (never below ``EPS``): the range maps onto E4M3's finite range."""
    return (amax / FP8_MAX).clamp_min(EPS)


def fake_quant_fp8(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """q(x) = s · E4M3(x / s), broadcasting s (per tensor, channel or token)."""
    return fp8_e4m3(x / scale) * scale


def quantize_fp8(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """FP8 E4M3 with scales from x itself: per ``tensor``, output ``channel`` (weights) or
    ``token`` (dynamic activations), s = max|x| / 448 over that slice."""
    lo, hi = minmax_range(x, granularity)
    return fake_quant_fp8(x, fp8_scale(torch.maximum(lo.abs(), hi.abs())))


def quantize_weight_groups(
    w: torch.Tensor, bits: int, symmetric: bool, group_size: int, method: str
) -> torch.Tensor:
    """Group-wise weight quantisation: one range per output channel and per ``group_size``
    consecutive input columns (GPTQ/AWQ's W4 g128 layout); when ``group_size`` does not divide
    the input width the last group is the remainder (narrower, its own range)."""
    parts = [
        quantize_weight(w[:, i : i + group_size], bits, symmetric, "channel", method)
        for i in range(0, w.shape[1], group_size)
    ]
    return torch.cat(parts, 1)


# --- Bondarenko et al. (2023)'s quantisers (outlier-free-transformers, ``quantization/``) -------

GRID_CANDIDATES = 100  # their MSE_Estimator's num_candidates
GRID_MARGIN = 0.5  # their range_margin: the search spans (0, max|w| + 0.5], an absolute margin
RUNNING_MOMENTUM = 0.9  # their RunningMinMaxEstimator's momentum
TOPK_MAX = 4096  # exact_percentile_range: topk up to this many values, kthvalue beyond


def grid_fake_quant(
    w: torch.Tensor, t: torch.Tensor | float, bits: int, signed: bool
) -> torch.Tensor:
    """Their ``SymmetricUniformQuantizer`` with range [-t, t] (``signed``: grid -2^(b-1)..2^(b-1)-1,
    scale t / (2^(b-1) - 1); int8: [-128, 127], scale t / 127) or [0, t] (unsigned: 0..2^b-1,
    scale t / (2^b - 1))."""
    if signed:
        qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qmin, qmax = 0, 2**bits - 1
    scale = torch.as_tensor(t, dtype=w.dtype, device=w.device) / qmax
    scale = scale.clamp_min(1e-8)  # their eps on the range and the scale
    return (w / scale).round().clamp(qmin, qmax) * scale


def grid_weight_range(w: torch.Tensor, bits: int = 8) -> tuple[float, bool]:
    """(t, signed): their per-tensor MSE weight range (``RangeEstimators.MSE``, ``OptMethod.grid``,
    what ``validate_clm.py``/``validate_mlm.py`` use for weights): t = k · s for the k in 1..100
    minimising Σ (w - q_t(w))² over every element (first k on ties), s = (max|w| + 0.5) / 100
    (``range_margin`` 0.5, absolute); one-sided (unsigned [0, t]) when min w ≥ 0."""
    signed = bool(w.min() < 0)
    step = (max(abs(float(w.min())), float(w.max())) + GRID_MARGIN) / GRID_CANDIDATES
    flat = w.reshape(-1)
    best_k, best = 1, float("inf")
    for k in range(1, GRID_CANDIDATES + 1):
        err = float((flat - grid_fake_quant(flat, step * k, bits, signed)).square().sum())
        if err < best:
            best_k, best = k, err
    return step * best_k, signed


def grid_quantize_weight(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Fake-quantise a weight (any shape, per tensor) as Bondarenko et al. do:
    :func:`grid_weight_range` then :func:`grid_fake_quant`."""
    t, signed = grid_weight_range(w, bits)
    return grid_fake_quant(w, t, bits, signed)


def exact_percentile_range(x: torch.Tensor, percentile: float) -> tuple[float, float]:
    """(P(100 - p), P(p)) of every element of x, numpy's default (linear) interpolation, as their
    ``RunningMinMaxEstimator`` computes with ``np.percentile`` (no subsampling, any size). The
    two order statistics each end needs come from one ``topk`` of the few values beyond them
    (p = 99.999 of 5·10⁵ values: the 7 largest), ``kthvalue`` when that would be many."""
    flat = x.detach().reshape(-1)
    n = flat.numel()
    out = []
    for q in (1.0 - percentile / 100.0, percentile / 100.0):
        pos = (n - 1) * q
        i = int(pos)
        j = min(i + 1, n - 1)
        if n - i <= TOPK_MAX:  # the (n - i) largest, descending: sorted index s is at n-1-s
            top = flat.topk(n - i).values
            a, b = float(top[n - 1 - i]), float(top[n - 1 - j])
        elif j + 1 <= TOPK_MAX:  # the (j + 1) smallest, ascending
            low = flat.topk(j + 1, largest=False).values
            a, b = float(low[i]), float(low[j])
        else:
            a = float(flat.kthvalue(i + 1).values)
            b = a if j == i else float(flat.kthvalue(j + 1).values)
        out.append(a + (b - a) * (pos - i))
    return out[0], out[1]
