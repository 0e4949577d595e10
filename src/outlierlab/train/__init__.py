"""Training: the :class:`Trainer` (``trainer.py``) and :func:`train`, one step
(``step.py``), callbacks, checkpoints, the run folder, DDP, signals, divergence.
See docs/train.md."""

from __future__ import annotations

from outlierlab.train.callbacks import Callback
from outlierlab.train.loop import train
from outlierlab.train.step import StepResult, TrainStep
from outlierlab.train.trainer import Trainer, TrainResult

__all__ = ["Callback", "StepResult", "TrainResult", "TrainStep", "Trainer", "train"]
