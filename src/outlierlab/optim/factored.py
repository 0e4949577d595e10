"""AdaFactor as the SOAP paper runs it, and the same step in Shampoo's eigenbasis (science §3, §7).

One optimiser, two settings (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using
Adam", §3: Shampoo with power 1/2 is AdaFactor in the eigenbasis of Shampoo's preconditioner):

- ``max_precond_dim=0``: **AdaFactor** — Adam whose second moment of a matrix gradient G (m × n)
  is factored: row and column EMAs (β2) of G², v̂ = r cᵀ / mean(r); first-moment momentum (β1);
  update m̂ / (√v̂ + ε) with Adam's bias corrections; decoupled weight decay. No relative step,
  no parameter-scale factor, no update clipping, no β2 schedule (those are Shazeer & Stern's
  AdaFactor, which ``torch.optim.Adafactor`` implements).
- ``max_precond_dim > 0``: **rotated AdaFactor** (Shampoo, power 1/2, EMA statistics) — Shampoo's
  Kronecker factors L = EMA(G Gᵀ), R = EMA(Gᵀ G) (β2) and their eigenvectors Q_L, Q_R; the
  AdaFactor step above runs on the rotated G' = Q_Lᵀ G Q_R and its update is rotated back,
  Q_L U' Q_Rᵀ. A side longer than ``max_precond_dim`` (an embedding's vocabulary) keeps the
  identity basis: no L or R of that size is ever allocated, and that side's statistic stays
  AdaFactor's factored one. Two things make its steps comparable to AdaFactor's (issue 23):

  * **SOAP's schedule** (nikhilvyas/SOAP, ``pytorch_optimizer.SOAP``): step 1 only accumulates
    L, R from g₁ and computes the basis (no parameter moves, every parameter of the optimiser
    skips it), so the current gradient never sets the basis it is projected on; from step 2 the
    step runs in the current basis, with bias corrections of s = t − 1, then L, R take g_t and
    the basis is recomputed when s is a multiple of ``precondition_frequency``.
  * **Grafting** (Agarwal et al. 2020, "Disentangling adaptive gradient methods"; the standard
    practice of distributed Shampoo): per parameter, the rotated direction is rescaled to the
    Frobenius norm of the plain AdaFactor update computed from the same momentum and its own
    unrotated row/column statistics, U = U_rot · ‖U_AF‖ / ‖U_rot‖. Without it the rotated
    update's RMS at step 1 was 12–130 × lr against AdaFactor's 1–3 × (scripts/shampoo_step_size.py).

Per step, for each parameter (1-D ones: plain Adam, ≥ 3-D ones: viewed as shape[0] × rest)::

    m ← lerp(m, G, 1-β1)                          (kept unrotated, as in SOAP)
    r ← lerp(r, rowmean(G'²), 1-β2),  c ← lerp(c, colmean(G'²), 1-β2)
    v̂ = r cᵀ / mean(r) / (1-β2ˢ),   U' = Q_L [ (Q_Lᵀ m Q_R) / (1-β1ˢ) / (√v̂ + ε) ] Q_Rᵀ
    rotated only: U = U' · ‖U_AF‖ / ‖U'‖ (U_AF: the same with Q = I and its own r, c);
                  L, R ← lerp(L, G Gᵀ, 1-β2), lerp(R, Gᵀ G, 1-β2); every k steps Q_L, Q_R ← eigh
    p ← p (1 - lr·wd) - lr·U
"""

from __future__ import annotations

import torch

_LOW = (torch.bfloat16, torch.float16)


class AdaFactor(torch.optim.Optimizer):
    """AdaFactor with momentum (``max_precond_dim=0``) or rotated AdaFactor (> 0); see the
    module docstring. ε is Adam's (added to √v̂); weight decay is decoupled (scaled by lr)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_precond_dim: int = 0,
                 precondition_frequency: int = 10):  # fmt: skip
        if precondition_frequency < 1 or max_precond_dim < 0:
            raise ValueError("precondition_frequency must be ≥ 1 and max_precond_dim ≥ 0")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        max_precond_dim=max_precond_dim,
                        precondition_frequency=precondition_frequency)  # fmt: skip
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)
        return loss

    def _update(self, p: torch.Tensor, group: dict) -> None:
        b1, b2 = group["betas"]
        g = p.grad if p.ndim < 3 else p.grad.reshape(p.shape[0], -1)
        rotated = group["max_precond_dim"] > 0
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(g)
            if g.ndim < 2:
                state["exp_avg_sq"] = torch.zeros_like(g)
            else:
                state["row"] = g.new_zeros(g.shape[0])
                state["col"] = g.new_zeros(g.shape[1])
                if rotated:  # the grafted AdaFactor's own (unrotated) statistics
                    state["graft_row"] = g.new_zeros(g.shape[0])
                    state["graft_col"] = g.new_zeros(g.shape[1])
                for side, n in (("L", g.shape[0]), ("R", g.shape[1])):
                    if rotated and n <= group["max_precond_dim"]:
                        state[side] = g.new_zeros(n, n)  # Shampoo's factor on this side
            if rotated:  # SOAP's first step: statistics and basis from g₁, no update
                if g.ndim == 2:
                    self._accumulate(g, state, b2, refresh=True)
                return
        state["step"] = t = state["step"] + 1
        m = state["exp_avg"].lerp_(g, 1 - b1)
        if g.ndim < 2:  # Adam
            v = state["exp_avg_sq"].lerp_(g.square(), 1 - b2)
            update = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt_().add_(group["eps"]))
        else:
            rotate = _rotation(state.get("QL"), state.get("QR"))
            update = rotate(_factored(rotate(m), rotate(g), state["row"], state["col"], b1, b2,
                                      t, group["eps"]), back=True)  # fmt: skip
            if rotated:
                graft = _factored(m, g, state["graft_row"], state["graft_col"], b1, b2, t,
                                  group["eps"])  # fmt: skip
                tiny = torch.finfo(update.dtype).tiny
                update.mul_(graft.norm() / update.norm().clamp_min(tiny))
                self._accumulate(g, state, b2, refresh=t % group["precondition_frequency"] == 0)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update.view_as(p), alpha=-group["lr"])

    @staticmethod
    def _accumulate(g: torch.Tensor, state: dict, beta: float, refresh: bool) -> None:
        """Add g to the EMA Kronecker factors (β2) and recompute their eigenbases when due."""
        for side in ("L", "R"):
            if side in state:
                state[side].lerp_(g @ g.T if side == "L" else g.T @ g, 1 - beta)
                if refresh:
                    state["Q" + side] = _eigenvectors(state[side])


def _factored(m: torch.Tensor, g: torch.Tensor, row: torch.Tensor, col: torch.Tensor, b1: float,
              b2: float, t: int, eps: float) -> torch.Tensor:  # fmt: skip
    """AdaFactor's update from momentum m and gradient g (both already in the basis used):
    updates the row/column EMAs of g² in place and returns m̂ / (√v̂ + ε)."""
    g2 = g.square()
    r = row.lerp_(g2.mean(1), 1 - b2)
    c = col.lerp_(g2.mean(0), 1 - b2)
    v = torch.outer(r, c).div_(r.mean().clamp_min(torch.finfo(r.dtype).tiny) * (1 - b2**t))
    return (m / (1 - b1**t)).div_(v.sqrt_().add_(eps))


def _rotation(ql: torch.Tensor | None, qr: torch.Tensor | None):
    """``rotate(x, back=False)``: Q_Lᵀ x Q_R (back: Q_L x Q_Rᵀ), identity on a ``None`` side."""

    def rotate(x: torch.Tensor, back: bool = False) -> torch.Tensor:
        if ql is not None:
            x = ql @ x if back else ql.T @ x
        if qr is not None:
            x = x @ qr.T if back else x @ qr
        return x

    return rotate


def _eigenvectors(a: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix, largest eigenvalue first (columns), computed in
    at least fp32 (float64 if fp32 fails to converge)."""
    x = a.float() if a.dtype in _LOW else a
    try:
        q = torch.linalg.eigh(x)[1]
    except RuntimeError:  # ill-conditioned: retry in float64
        q = torch.linalg.eigh(x.double())[1].to(x.dtype)
    return q.flip(1).to(a.dtype)
