"""Training: the loop (:func:`train`), checkpoints, the run folder, DDP, signals, divergence;
the ``train``/``log`` config sections (:mod:`outlierlab.train.config`). See docs/train.md.

``train`` and ``RunResult`` are imported lazily, so ``outlierlab.config`` can import
``outlierlab.train.config`` without importing the loop (which imports ``outlierlab.config``).
"""

from __future__ import annotations

from importlib import import_module

_LAZY = {"RunResult": "outlierlab.train.loop", "train": "outlierlab.train.loop"}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'outlierlab.train' has no attribute {name!r}")
