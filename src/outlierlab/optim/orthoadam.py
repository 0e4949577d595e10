"""OrthoAdam (Kaul et al., ICLR 2025, arXiv 2410.17174): Adam whose moments live in a fixed
random orthogonal basis per parameter, so no coordinate of the parameter is privileged.

For a parameter seen as a matrix W (d₀ × rest; vectors are d × 1) with gradient G and fixed
Haar-random orthogonal Q_L (d₀ × d₀), Q_R (rest × rest), drawn once from a seed:

    G̃ = Q_Lᵀ G Q_R;  m ← β₁m + (1−β₁)G̃;  v ← β₂v + (1−β₂)G̃²;
    U = Q_L (m̂ / (√v̂ + ε)) Q_Rᵀ;  W ← W(1 − lr·wd) − lr·U   (m̂, v̂ bias-corrected)

The paper rotates each parameter by one orthogonal matrix; here the rotation is the Kronecker
product Q_R ⊗ Q_L of two factors (an orthogonal matrix of the flattened parameter that mixes
every row and every column, at O(d₀² + rest²) memory instead of O(d₀²·rest²)). A side longer
than ``max_precond_dim`` (a vocabulary) is not rotated, as in SOAP. The bases are not saved in
the state dict: they are redrawn from ``seed`` and the parameter's position on load.
"""

from __future__ import annotations

import torch


def random_orthogonal(n: int, seed: int) -> torch.Tensor:
    """A Haar-distributed orthogonal n × n matrix (float64), a function of ``seed`` only: the Q
    of the QR of a Gaussian matrix, columns signed so that diag(R) > 0 (Mezzadri 2007)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, 1.0)


class OrthoAdam(torch.optim.Optimizer):
    """Adam with decoupled weight decay run in a fixed random orthogonal basis per parameter
    (module docstring). Same arguments as ``torch.optim.AdamW`` plus ``max_precond_dim`` and
    ``seed``."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, max_precond_dim: int = 4096,
                 seed: int = 0) -> None:  # fmt: skip
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        max_precond_dim=max_precond_dim, seed=seed)  # fmt: skip
        super().__init__(params, defaults)
        self._bases: dict[int, tuple[torch.Tensor | None, torch.Tensor | None]] = {}

    def basis(self, p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(Q_L, Q_R) of parameter ``p`` (None: that side is not rotated)."""
        key = id(p)
        if key not in self._bases:
            index, group = next(
                (i, g) for i, (g, q) in enumerate(
                    (g, q) for g in self.param_groups for q in g["params"]) if q is p
            )  # fmt: skip
            rows = p.shape[0] if p.ndim else 1
            sides = (rows, p.numel() // max(rows, 1))
            qs = tuple(
                random_orthogonal(n, 2 * (group["seed"] * 1_000_003 + index) + s).to(
                    p.device, torch.float32 if p.dtype in (torch.float16, torch.bfloat16)
                    else p.dtype)
                if 1 < n <= group["max_precond_dim"] else None
                for s, n in enumerate(sides)
            )  # fmt: skip
            self._bases[key] = qs  # type: ignore[assignment]
        return self._bases[key]

    @staticmethod
    def _as_matrix(t: torch.Tensor) -> torch.Tensor:
        rows = t.shape[0] if t.ndim else 1
        return t.reshape(rows, -1)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                ql, qr = self.basis(p)
                g = self._as_matrix(p.grad)
                g = g.to(ql.dtype if ql is not None else qr.dtype if qr is not None else g.dtype)
                if ql is not None:
                    g = ql.T @ g
                if qr is not None:
                    g = g @ qr
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(g)
                    state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                t = float(state["step"])
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.lerp_(g, 1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                u = (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps)
                if ql is not None:
                    u = ql @ u
                if qr is not None:
                    u = u @ qr.T
                p.mul_(1 - lr * wd)
                p.add_(u.reshape(p.shape).to(p.dtype), alpha=-lr)
        return loss
