"""Training: the loop (:func:`train`), checkpoints, the run folder, DDP, signals, divergence.
See docs/train.md."""

from __future__ import annotations

from outlierlab.train.loop import RunResult, train

__all__ = ["RunResult", "train"]
