"""Outlier features inside a Hugging Face ``transformers.Trainer`` (docs/integrations.md).

`OutlierCallback` measures the residual stream (science §1 "Where") on the training batch of every
``every``-th optimiser step — all micro-batches of that step under gradient accumulation — and
adds Kurt (Eq. 1), MMR (Eq. 2) and token cos-sim, per layer and mean / max, to the log entry
the Trainer writes at that step, so they reach ``trainer.state.log_history``, TensorBoard, W&B
and every other ``report_to`` integration through the normal log path.

Requires ``transformers`` (``pip install 'outlierlab[hf]'``).
"""

from __future__ import annotations

import logging
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "outlierlab.integrations.hf needs transformers: pip install 'outlierlab[hf]'"
    ) from exc

from outlierlab.errors import ConfigError
from outlierlab.integrations.core import MeasuringCallback

__all__ = ["OutlierCallback"]


class OutlierCallback(TrainerCallback, MeasuringCallback):
    """Log outlier-feature metrics every ``every`` optimiser steps of a ``Trainer``.

    Add it with ``OutlierCallback(...).attach(trainer)``: that puts it first among the
    Trainer's callbacks, so the reporting integrations (TensorBoard, W&B, ...) that
    ``report_to`` installs see its metrics. Passed as ``Trainer(callbacks=[...])`` it runs
    after them: metrics still reach ``trainer.state.log_history`` and later callbacks,
    and a one-time warning says the reporters missed them.

    Steps are 1-based as in ``state.global_step``: step s is measured when ``s % every == 0``;
    the Trainer is asked to log at that step (``control.should_log``) even off its
    ``logging_steps`` grid.
    """

    def __init__(self, every: int = 100, **kwargs: Any) -> None:
        """Arguments of `MeasuringCallback`: ``every``, ``points``, ``alert_kurtosis``,
        ``prefix``, ``per_layer``, ``cos_max_tokens``, ``seed``."""
        MeasuringCallback.__init__(self, every, **kwargs)
        self._attached = False
        self._pending: tuple[int, dict[str, float]] | None = None  # (step, logs) to add
        self._warned_order = False

    def attach(self, trainer: Any) -> OutlierCallback:
        """Register with ``trainer`` ahead of its reporting callbacks; returns self."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._attached = True
        return self

    # -- Trainer events -------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ConfigError("OutlierCallback needs the model: use it inside transformers.Trainer")
        self._open(model)
        self._pending = None

    def on_step_begin(self, args, state, control, **kwargs):
        # Called before the first micro-batch of optimiser step state.global_step + 1; the
        # monitor stays on through every micro-batch until on_step_end.
        self._begin_step(state.global_step + 1)

    def on_step_end(self, args, state, control, **kwargs):
        measured = self._end_step(all_reduce=_distributed(), alert=state.is_world_process_zero)
        if measured is not None:
            self._pending = measured
            control.should_log = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._pending is None or logs is None:
            return
        step, metrics = self._pending
        if step != state.global_step:
            return
        self._pending = None
        logs.update(metrics)
        # Trainer.log appended a copy of `logs` to log_history just before this event.
        last = state.log_history[-1] if state.log_history else None
        if last is not None and last.get("step") == step:
            last.update(metrics)
        if not self._attached and not self._warned_order and _reports(args):
            self._warned_order = True
            logging.getLogger("outlierlab").warning(
                "OutlierCallback runs after the report_to callbacks, which did not receive its "
                "metrics; add it with OutlierCallback(...).attach(trainer)"
            )

    def on_train_end(self, args, state, control, **kwargs):
        self.close()


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reports(args: Any) -> bool:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return any(r not in ("none", None) for r in report_to)
