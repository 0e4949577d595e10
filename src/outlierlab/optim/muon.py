"""Muon as its authors run it (science §3): Muon on the 2-D hidden matrices, AdamW on embeddings,
the output head, norms and gains, seen by a training loop as one optimiser.

:class:`Muon` is ``torch.optim.Muon`` with the Newton–Schulz iterations in float32 on the CPU
(torch runs them in bfloat16, the fast path on GPUs but ~20× slower than fp32 on a CPU without
bf16 matmul units); on other devices it is torch's own step.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` (same arguments, state and update) whose Newton–Schulz runs in
    float32 when the parameter is on the CPU."""

    @torch.no_grad()
    def step(self, closure=None):
        if not any(p.device.type == "cpu" for g in self.param_groups for p in g["params"]):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"].lerp_(p.grad, 1 - mu)
                u = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                u = newton_schulz(u, group["ns_coefficients"], group["ns_steps"], group["eps"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(u.to(p.dtype), alpha=-_adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        return loss


def _adjusted_lr(lr: float, how: str | None, shape: torch.Size) -> float:
    """torch.optim.Muon's per-shape lr: √max(1, A/B) (Keller Jordan's, the default) or
    0.2·√max(A, B) (``match_rms_adamw``, Moonshot's)."""
    a, b = shape[:2]
    if how == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(a, b))
    return lr * math.sqrt(max(1, a / b))


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float) -> torch.Tensor:
    """Muon's quintic Newton–Schulz orthogonalisation of a 2-D ``g`` (Keller Jordan's
    iteration, as in ``torch.optim.Muon``), computed in float32."""
    a, b, c = coefficients
    x = g.float()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def muon_params(model: nn.Module) -> set[int]:
    """ids of the 2-D hidden matrices: every 2-D parameter except embedding tables and the
    output head (a ``Linear`` whose output size is the vocabulary, or one named ``*head*``)."""
    excluded: set[int] = set()
    vocab = {m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, m in model.named_modules():
        head = isinstance(m, nn.Linear) and (m.out_features in vocab or "head" in name)
        if isinstance(m, nn.Embedding) or head:
            excluded.add(id(m.weight))
    return {id(p) for p in model.parameters() if p.ndim == 2 and id(p) not in excluded}


class MultiOptimizer:
    """Several optimisers over disjoint parameters, seen by the loop as one
    (``step``, ``zero_grad``, ``param_groups``, ``state_dict``, ``load_state_dict``)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {str(i): o.state_dict() for i, o in enumerate(self.optimizers)}

    def load_state_dict(self, sd: dict) -> None:
        if len(sd) != len(self.optimizers):
            raise ValueError(f"state for {len(sd)} optimisers, have {len(self.optimizers)}")
        for i, o in enumerate(self.optimizers):
            o.load_state_dict(sd[str(i)])
