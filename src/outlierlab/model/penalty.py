"""TWEO (Liang et al. 2025, arXiv 2511.23225): an L_p penalty on the block outputs added to
the training loss, L = CE + λ · (1/L) Σ_l mean(|h_l|^p) (docs/mitigations.md).

The paper divides activations by a threshold τ, |h/τ|^p = |h|^p / τ^p: here τ is folded into
λ. :func:`tweo_penalty` is the formula for anyone's block outputs; :class:`BlockOutputPenalty`
collects them from a model's residual points with forward hooks (what ``train.tweo_weight``
uses).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def tweo_penalty(outputs: Sequence[torch.Tensor], p: float = 4.0) -> torch.Tensor:
    """(1/L) Σ_l mean over every element of |h_l|^p, in float32 (float64 stays), 0-d."""
    if not outputs:
        raise ValueError("tweo_penalty needs at least one block output")
    terms = [h.float().abs().pow(p).mean() if h.dtype != torch.float64 else h.abs().pow(p).mean()
             for h in outputs]  # fmt: skip
    return torch.stack(terms).mean()


class BlockOutputPenalty:
    """Forward hooks on the blocks of ``model`` (``residual_points()`` without the embedding
    point, or ``modules``) that keep |h|^p means of every forward until :meth:`take`.
    Use as a context manager (hooks removed on exit)."""

    def __init__(self, model: nn.Module, p: float = 4.0, modules: Sequence[nn.Module] = ()):
        if not modules:
            points = model.residual_points()  # type: ignore[operator]
            modules = [m for name, m in points.items() if name != "embed.resid_post"]
        self.p, self._terms = p, []
        self._hooks = [m.register_forward_hook(self._hook) for m in modules]
        self.layers = len(self._hooks)

    def _hook(self, module: nn.Module, args, output) -> None:
        if torch.is_grad_enabled():  # training forwards only, not evaluation
            self._terms.append(tweo_penalty([output], self.p))

    def take(self) -> torch.Tensor | None:
        """The penalty (1/L) Σ_l mean|h_l|^p of the forwards since the last call (averaged
        over them), or None when there were none."""
        terms, self._terms = self._terms, []
        return torch.stack(terms).mean() if terms else None

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._terms = [], []

    def __enter__(self) -> BlockOutputPenalty:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
