"""Learning-rate schedules: a pure function of the step, so resuming needs no scheduler state."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from outlierlab.fields import bad

SCHEDULES = ("cosine", "linear", "wsd", "constant")


def lr_factor(
    step: int,
    total: int,
    schedule: str = "cosine",
    warmup: int = 0,
    min_ratio: float = 0.0,
    decay_steps: int = 0,
) -> float:
    """Multiplier of the peak lr for optimiser step ``step`` (0-based) of ``total``.

    Linear warm-up over ``warmup`` steps ((s+1)/warmup), then: ``cosine`` to ``min_ratio``,
    ``linear`` to ``min_ratio``, ``wsd`` (warm-up, stable, then linear decay over the last
    ``decay_steps``), or ``constant``.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        start = total - decay_steps
        if step < start or decay_steps <= 0:
            return 1.0
        p = (step - start) / decay_steps
        return 1.0 - (1.0 - min_ratio) * min(p, 1.0)
    span = max(total - warmup, 1)
    p = min((step - warmup) / span, 1.0)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise bad("optim.schedule", schedule, ", ".join(SCHEDULES))


def set_lr(optimizer: Any, factor: float) -> float:
    """Set every group's lr to ``initial_lr × factor``; returns the first group's lr."""
    groups: Iterable[dict] = optimizer.param_groups
    lr = None
    for g in groups:
        g["lr"] = g["initial_lr"] * factor
        lr = g["lr"] if lr is None else lr
    return float(lr or 0.0)
