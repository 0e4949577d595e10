"""``train(cfg, resume=False) -> TrainResult``: one run of the :class:`~outlierlab.train.Trainer`
(data layout, DDP semantics and fault handling: ``trainer.py``)."""

from __future__ import annotations

from collections.abc import Iterable

from outlierlab.config import RunConfig
from outlierlab.train.callbacks import TrainerCallback
from outlierlab.train.trainer import Trainer, TrainResult


def train(cfg: RunConfig, resume: bool = False, *, progress: bool = True,
          callbacks: Iterable[TrainerCallback] = (),
          allow_data_change: bool = False) -> TrainResult:
    """Train ``cfg`` into the run folder ``cfg.out`` (see docs/ARCHITECTURE.md); with
    ``resume``, continue from its latest checkpoint (refused when its data changed, unless
    ``allow_data_change``). The folder is locked for the run. ``progress=False`` silences the
    console; ``callbacks`` as in :mod:`outlierlab.train.callbacks`."""
    with Trainer(cfg, resume, progress=progress, callbacks=callbacks,
                 allow_data_change=allow_data_change) as trainer:
        return trainer.fit()
