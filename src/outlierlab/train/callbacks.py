"""The :class:`~outlierlab.train.Trainer`'s callback protocol, typed.

A callback implements :class:`TrainerCallback` (subclass :class:`Callback` to inherit no-ops
for the hooks it does not need); the trainer calls the hooks on every rank, in list order:

- ``on_train_begin(trainer)``: everything is built and restored; before the first step.
- ``on_step_begin(trainer, step)``: optimiser step ``step`` (1-based) is about to run.
- ``on_step_end(trainer, step, row)``: the update of ``step`` is done; ``row`` is a dict the
  callback may add metrics to (a non-empty row is logged at this step).
- ``on_log(trainer, row)``: ``row`` was written to the run's metrics (on rank 0) and the sinks.
- ``on_save(trainer, step)``: a checkpoint of ``step`` was written.
- ``on_train_end(trainer, status)``: the loop ended with ``status`` (also on errors: ``crashed``).

``trainer`` is a :class:`TrainerView`: what a callback may read (and ``stop.requested``, which
it may set to end the run after this step with a checkpoint, as SIGTERM does).
:class:`outlierlab.measuring.MeasureEvery` (the outlier monitor) and
:class:`outlierlab.profile.ProfileEvery` are callbacks; the benchmarks time steps with another.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from outlierlab.config import RunConfig
    from outlierlab.run_folder import RunFolder
    from outlierlab.train.distributed import Dist

HOOKS = ("on_train_begin", "on_step_begin", "on_step_end", "on_log", "on_save", "on_train_end")


class StopRequest(Protocol):
    requested: str | None
    """Why the run should stop after this step (a signal's name); None: go on."""


class TrainerView(Protocol):
    """What a callback may read of the trainer (the :class:`~outlierlab.train.Trainer` is one)."""

    cfg: RunConfig
    dist: Dist
    model: nn.Module  # the bare model (not wrapped by DDP or torch.compile)
    optimizer: torch.optim.Optimizer
    step: int  # optimiser steps done
    tokens: int  # training tokens seen (all ranks)
    run: RunFolder | None
    stop: StopRequest

    def local_micro_batches(self) -> list[torch.Tensor]:
        """This rank's micro-batches (inputs) of the last step's global batch."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The training precision's autocast context."""
        ...


@runtime_checkable
class TrainerCallback(Protocol):
    """The hooks a trainer calls (module docstring)."""

    def on_train_begin(self, trainer: TrainerView) -> None: ...

    def on_step_begin(self, trainer: TrainerView, step: int) -> None: ...

    def on_step_end(self, trainer: TrainerView, step: int, row: dict[str, Any]) -> None: ...

    def on_log(self, trainer: TrainerView, row: dict[str, Any]) -> None: ...

    def on_save(self, trainer: TrainerView, step: int) -> None: ...

    def on_train_end(self, trainer: TrainerView, status: str) -> None: ...


class Callback:
    """No-op base implementing :class:`TrainerCallback`: override the hooks you need."""

    def on_train_begin(self, trainer: TrainerView) -> None:
        pass

    def on_step_begin(self, trainer: TrainerView, step: int) -> None:
        pass

    def on_step_end(self, trainer: TrainerView, step: int, row: dict[str, Any]) -> None:
        pass

    def on_log(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        pass

    def on_save(self, trainer: TrainerView, step: int) -> None:
        pass

    def on_train_end(self, trainer: TrainerView, status: str) -> None:
        pass


class Callbacks:
    """The trainer's callbacks, called in list order. Each must implement
    :class:`TrainerCallback` (a :class:`TypeError` naming the missing hooks otherwise)."""

    def __init__(self, callbacks: Iterable[TrainerCallback] = ()) -> None:
        self.items: list[TrainerCallback] = []
        for cb in callbacks:
            self.append(cb)

    def append(self, callback: TrainerCallback) -> None:
        missing = [h for h in HOOKS if not callable(getattr(callback, h, None))]
        if missing:
            raise TypeError(f"{type(callback).__name__} is not a trainer callback: it lacks "
                            f"{', '.join(missing)}; subclass outlierlab.train.Callback")
        self.items.append(callback)

    def on_train_begin(self, trainer: TrainerView) -> None:
        for cb in self.items:
            cb.on_train_begin(trainer)

    def on_step_begin(self, trainer: TrainerView, step: int) -> None:
        for cb in self.items:
            cb.on_step_begin(trainer, step)

    def on_step_end(self, trainer: TrainerView, step: int, row: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_step_end(trainer, step, row)

    def on_log(self, trainer: TrainerView, row: dict[str, Any]) -> None:
        for cb in self.items:
            cb.on_log(trainer, row)

    def on_save(self, trainer: TrainerView, step: int) -> None:
        for cb in self.items:
            cb.on_save(trainer, step)

    def on_train_end(self, trainer: TrainerView, status: str) -> None:
        for cb in self.items:
            cb.on_train_end(trainer, status)
