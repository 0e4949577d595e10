"""Training: the :class:`Trainer` (``trainer.py``) and :func:`train`, one step
(``step.py``), callbacks, checkpoints, DDP, signals, divergence; the ``train``/``log`` config
sections (:mod:`outlierlab.train.config`). See docs/train.md.

The exports are imported lazily, so ``outlierlab.config`` can import ``outlierlab.train.config``
without importing the trainer (which imports ``outlierlab.config``).
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {
    "Callback": "outlierlab.train.callbacks",
    "StepResult": "outlierlab.train.step",
    "TrainResult": "outlierlab.train.trainer",
    "TrainStep": "outlierlab.train.step",
    "Trainer": "outlierlab.train.trainer",
    "TrainerCallback": "outlierlab.train.callbacks",
    "TrainerView": "outlierlab.train.callbacks",
    "train": "outlierlab.train.loop",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'outlierlab.train' has no attribute {name!r}")
