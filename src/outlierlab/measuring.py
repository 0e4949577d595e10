"""``MeasureEvery(k)``: measure the residual stream (science §1) on every k-th optimiser step.

The one place that decides which training steps are measured and drives an
:class:`~outlierlab.monitor.OutlierMonitor` through them: switched on when step s (1-based)
with ``s % k == 0`` begins, so every micro-batch of that step is measured, and off again when
it ends, with the statistics collected (all-reduced under DDP) and cleared. Used by

- the :class:`~outlierlab.train.Trainer` (as one of its callbacks, ``log.kurtosis_every``),
- ``outlierlab.integrations.hf`` / ``.lightning`` (through ``integrations.core``),
- the benchmarks (through the trainer) and ``benchmarks/gpu_check.py`` (its own loops call
  :meth:`begin_step` / :meth:`end_step`).

Subsamples (Eq. 2 and cos-sim, at most ``mmr_max_tokens`` / ``cos_max_tokens`` tokens per
forward) are seeded from the step and the global micro-batch: micro-batch m of step s (m = a·w + r
for rank r of w at accumulation step a) is forward number ``s · 2**20 + m`` for
:meth:`OutlierMonitor.number_forwards`, so a resumed run draws exactly the subsamples of an
uninterrupted one, and 2 ranks those of 1 process accumulating the same global batch. Imports
neither transformers nor lightning.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from outlierlab.errors import ConfigError
from outlierlab.monitor import OutlierMonitor, due
from outlierlab.train.callbacks import Callback, TrainerView

FORWARDS_PER_STEP = 1 << 20
"""Stride of the forward numbering between steps (more measured forwards per step than this
would repeat a subsample seed; a step has as many as it has micro-batches)."""


@dataclass
class Measured:
    """What one measured step gave: its number, the monitor's per-point results and summary,
    and the mean attention entropy per attention layer (empty when the model exposes none)."""

    step: int
    results: dict[str, dict[str, Any]]
    summary: dict[str, float]
    attn_entropy: dict[str, float] = field(default_factory=dict)

    def row(self) -> dict[str, Any]:
        """The fields of a ``metrics.jsonl`` row (docs/ARCHITECTURE.md "Run folder")."""
        res = self.results
        row: dict[str, Any] = {
            key: {k: float(v[key]) for k, v in res.items()}
            for key in ("kurtosis", "mmr", "cos_sim", "kurtosis_authors", "corr_authors")
        }
        row["kurtosis_mean"] = self.summary["kurtosis_mean"]
        row["kurtosis_max"] = self.summary["kurtosis_max"]
        if self.attn_entropy:
            finite = [v for v in self.attn_entropy.values() if math.isfinite(v)]
            row["attn_entropy"] = dict(self.attn_entropy)
            row["attn_entropy_min"] = min(finite) if finite else math.nan
        return row


class MeasureEvery(Callback):
    """Measure optimiser steps s (1-based) with ``s % every == 0``; ``every=0`` never measures.

    A loop calls :meth:`open` (hooks ``model``, switched off), then around each step
    :meth:`begin_step` and :meth:`end_step` (→ :class:`Measured` or None), and :meth:`close`.
    As a :class:`~outlierlab.train.Trainer` callback the ``on_*`` methods do this and add the
    measured step's :meth:`Measured.row` to that step's metrics row. With ``replay`` (the
    trainer's ``train.compile``) the hooks are attached only for an extra eager no-grad forward
    of this rank's micro-batches after the update, so a compiled graph never carries them.
    """

    def __init__(
        self,
        every: int,
        points: str | Sequence[str] = "auto",
        cos_max_tokens: int | None = 1024,
        mmr_max_tokens: int | None = 256,
        seed: int = 0,
        replay: bool = False,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise ConfigError(
                f"every={every!r} is not allowed; allowed: an integer ≥ 1 (optimiser steps), "
                "or 0 for never"
            )
        self.every, self.points, self.seed, self.replay = every, points, seed, replay
        self.cos_max_tokens, self.mmr_max_tokens = cos_max_tokens, mmr_max_tokens
        self.monitor: OutlierMonitor | None = None
        self.measuring: int | None = None  # the step being measured, between begin and end

    def due(self, step: int) -> bool:
        """Whether optimiser step ``step`` (1-based) is measured."""
        return due(step, self.every)

    # -- the monitor's life cycle -------------------------------------------------------------

    def open(self, model: nn.Module) -> None:
        """Hook ``model`` (switched off until a measured step begins)."""
        self.close()
        mon = OutlierMonitor(model, points=self.points, cos_max_tokens=self.cos_max_tokens,
                             mmr_max_tokens=self.mmr_max_tokens, seed=self.seed)  # fmt: skip
        mon.__enter__()
        mon.enabled = False
        self.monitor = mon

    def begin_step(self, step: int, rank: int = 0, world: int = 1) -> bool:
        """Step ``step`` begins: if it is due, measure every forward until :meth:`end_step`.
        Rank ``rank`` of ``world`` numbers its forwards by global micro-batch (``trainer.py``:
        rank r takes micro-batch a·w + r at accumulation step a), so the subsamples do not depend on
        the rank count."""
        if self.monitor is None or self.measuring is not None or not self.due(step):
            return False
        self.monitor.reset()
        # Subsample seeds derive from (step, global micro-batch), not from a running count:
        # a resumed run, or one on another number of ranks, draws the same subsamples.
        self.monitor.number_forwards(step * FORWARDS_PER_STEP + rank, stride=world)
        self.monitor.enabled = True
        self.measuring = step
        return True

    def number(self, index: int) -> None:
        """Number the next forward of the measured step ``index`` (a global batch index, e.g.
        an evaluation group that does not depend on the rank count)."""
        if self.monitor is not None and self.measuring is not None:
            self.monitor.number_forwards(self.measuring * FORWARDS_PER_STEP + index)

    def end_step(self, all_reduce: bool = False) -> Measured | None:
        """The measured step has ended: its results (summed over ranks with ``all_reduce``;
        every rank must call it then), or None if no step was being measured or nothing was."""
        if self.monitor is None or self.measuring is None:
            return None
        step, self.measuring = self.measuring, None
        self.monitor.enabled = False
        results = self.monitor.results(all_reduce=all_reduce)
        summary = self.monitor.summary(results)
        entropy = self.monitor.attention_entropy(all_reduce=all_reduce)
        self.monitor.reset()
        return Measured(step, results, summary, entropy) if results else None

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside are not measured (FSDP's padding forwards, ``mean_loss``)."""
        was = self.monitor is not None and self.monitor.enabled
        if was:
            self.monitor.enabled = False
        try:
            yield
        finally:
            if was:
                self.monitor.enabled = True

    def close(self) -> None:
        """Remove the monitor's hooks (idempotent)."""
        if self.monitor is not None:
            mon, self.monitor = self.monitor, None
            mon.close()
        self.measuring = None

    # -- as a Trainer callback (outlierlab.train.callbacks.TrainerCallback) ------------------

    def on_train_begin(self, trainer: TrainerView) -> None:
        if not self.replay:
            self.open(trainer.model)

    def on_step_begin(self, trainer: TrainerView, step: int) -> None:
        self.begin_step(step, trainer.dist.rank, trainer.dist.world_size)

    def on_step_end(self, trainer: TrainerView, step: int, row: dict[str, Any]) -> None:
        if self.replay and self.due(step):
            self._replay(trainer, step)
        measured = self.end_step(all_reduce=trainer.dist.enabled)
        if self.replay:
            self.close()
        if measured is not None:
            row.update(measured.row())

    def _replay(self, trainer: TrainerView, step: int) -> None:
        """Measure this rank's micro-batches of the step in extra eager no-grad forwards."""
        self.open(trainer.model)
        self.begin_step(step, trainer.dist.rank, trainer.dist.world_size)
        with torch.no_grad(), trainer.autocast():
            for xb in trainer.local_micro_batches():
                trainer.model(xb)

    def on_train_end(self, trainer: TrainerView, status: str) -> None:
        self.close()

