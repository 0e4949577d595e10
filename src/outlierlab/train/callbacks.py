"""The :class:`~outlierlab.train.Trainer`'s callback protocol.

A callback is any object with some of these methods (subclass :class:`Callback` to inherit
no-ops for the rest); the trainer calls them on every rank, in list order:

- ``on_train_begin(trainer)``: everything is built and restored; before the first step.
- ``on_step_begin(trainer, step)``: optimiser step ``step`` (1-based) is about to run.
- ``on_step_end(trainer, step, row)``: the update of ``step`` is done; ``row`` is a dict the
  callback may add metrics to (a non-empty row is logged at this step).
- ``on_log(trainer, row)``: ``row`` was written to ``metrics.jsonl`` (on rank 0) and the sinks.
- ``on_save(trainer, step)``: a checkpoint of ``step`` was written.
- ``on_train_end(trainer, status)``: the loop ended with ``status`` (also on errors: ``crashed``).

:class:`outlierlab.measuring.MeasureEvery` (the outlier monitor) is one; the benchmarks time
steps with another.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class Callback:
    """No-op base: override the events you need."""

    def on_train_begin(self, trainer: Any) -> None:
        pass

    def on_step_begin(self, trainer: Any, step: int) -> None:
        pass

    def on_step_end(self, trainer: Any, step: int, row: dict[str, Any]) -> None:
        pass

    def on_log(self, trainer: Any, row: dict[str, Any]) -> None:
        pass

    def on_save(self, trainer: Any, step: int) -> None:
        pass

    def on_train_end(self, trainer: Any, status: str) -> None:
        pass


class Callbacks:
    """A list of callbacks; ``callbacks.on_step_begin(trainer, step)`` calls each one's
    ``on_step_begin`` that exists."""

    EVENTS = ("on_train_begin", "on_step_begin", "on_step_end", "on_log", "on_save",
              "on_train_end")  # fmt: skip

    def __init__(self, callbacks: Iterable[Any] = ()) -> None:
        self.items = list(callbacks)

    def append(self, callback: Any) -> None:
        self.items.append(callback)

    def __getattr__(self, event: str):
        if event not in self.EVENTS:
            raise AttributeError(event)
        handlers = [h for cb in self.items if (h := getattr(cb, event, None)) is not None]

        def call(*args: Any) -> None:
            for h in handlers:
                h(*args)

        return call
