"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers"), written here: the maintained libraries (``gptqmodel``,
``llmcompressor``; ``auto-gptq`` is archived) quantise whole models through their own pipelines
and packed kernels, mostly CUDA-first, where this toolkit needs the fake-quantised weight of one
linear on CPU from statistics its own calibration pass collects.

For one linear y = x Wᵀ (W: out × in) with calibration inputs X (N × in), GPTQ minimises
‖X Wᵀ − X Ŵᵀ‖² column by column (Optimal Brain Quantizer with a fixed column order):

    H = 2 XᵀX / N + λ I,  λ = 1 % · mean diag(H)  (dampening; dead inputs get H_jj = 1, W_:j = 0)
    U = Cholesky(H⁻¹)ᵀ (upper), so row j of U holds the OBS update of the remaining columns
    for column j = 0, 1, ...: q_j = Q(w_j); e_j = (w_j − q_j) / U_jj; w_k ← w_k − e_j U_jk (k > j)

i.e. w_k ← w_k − (w_j − q_j) [H_j⁻¹]_jk / [H_j⁻¹]_jj with H_j the Hessian of the columns not yet
quantised. Columns are processed in blocks (lazy batch updates: the update of later blocks is one
matrix product per block). Group-wise ranges (``group_size``): the range of group g is taken
from the columns of g as the error feedback has left them when the group starts (the reference
implementation's behaviour; blocks are aligned with groups). Act-order is off.
"""

from __future__ import annotations

import torch

from outlierlab.quant.quantizers import minmax_range, qrange, scale_zero_point

DAMP = 0.01  # λ = DAMP · mean diag(H)
BLOCK = 128  # columns per lazy-batch block


def _grid(
    w: torch.Tensor, bits: int, symmetric: bool, qmin: int, qmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale, qmin − z, qmax − z) per row of ``w`` from its min-max range, each of shape (out,)."""
    scale, zero = scale_zero_point(*minmax_range(w, "channel"), bits, symmetric)
    scale, zero = scale.reshape(-1), zero.reshape(-1)
    return scale, qmin - zero, qmax - zero


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    symmetric: bool,
    group_size: int | None = None,
    damp: float = DAMP,
    block: int = BLOCK,
) -> torch.Tensor:
    """Ŵ (out × in) for weight ``w`` and Hessian ``h`` (in × in, any positive multiple of XᵀX),
    per output channel (min-max ranges), or per channel and group of ``group_size`` columns.
    Computed in ``w``'s dtype promoted to at least float32 (float64 in the tests)."""
    dtype = torch.promote_types(w.dtype, torch.float32)
    W = w.detach().to(dtype).clone()
    H = h.detach().to(dtype).clone()
    n = W.shape[1]
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    block = group_size if group_size is not None else block
    qmin, qmax = qrange(bits, symmetric)
    scale = lo = hi = None
    if group_size is None:
        scale, lo, hi = _grid(W, bits, symmetric, qmin, qmax)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        err = torch.empty_like(W1)
        if group_size is not None:  # the group starts here: its range from the updated columns
            scale, lo, hi = _grid(W1, bits, symmetric, qmin, qmax)
        diag = torch.diagonal(U1).tolist()
        for i in range(i2 - i1):  # q = clamp(round(w/s), qmin − z, qmax − z)·s; rank-1 update
            w_col = W1[:, i]
            q = torch.div(w_col, scale).round_()
            q = torch.clamp(q, lo, hi, out=q).mul_(scale)
            Q[:, i1 + i] = q
            e = torch.sub(w_col, q, out=err[:, i]).div_(diag[i])
            W1[:, i + 1 :].addr_(e, U1[i, i + 1 :], alpha=-1.0)
        W[:, i2:].addmm_(err, U[i1:i2, i2:], alpha=-1.0)
    return Q.to(w.dtype)
