"""Outlier features inside a Hugging Face ``transformers.Trainer`` (docs/integrations.md).

`OutlierCallback` measures the residual stream (SPEC §1 "Where") on the training batch of every
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
from outlierlab.integrations import flatten_results
from outlierlab.integrations.alert import Alert, OutlierAlert

__all__ = ["OutlierCallback"]


class OutlierCallback(TrainerCallback):
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

    def __init__(
        self,
        every: int = 100,
        points: str | list[str] = "auto",
        alert_kurtosis: float | None = None,
        prefix: str = "outliers/",
        per_layer: bool = True,
        cos_max_tokens: int = 1024,
        seed: int = 0,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ConfigError(f"every must be an integer ≥ 1 (optimiser steps), got {every!r}")
        if not isinstance(prefix, str):
            raise ConfigError(f"prefix must be a string such as 'outliers/', got {prefix!r}")
        self.every = every
        self.points = points
        self.prefix = prefix
        self.per_layer = per_layer
        self.cos_max_tokens = cos_max_tokens
        self.seed = seed
        self.alert = None if alert_kurtosis is None else OutlierAlert(alert_kurtosis)
        self.monitor = None
        self.last_results: dict[str, dict[str, Any]] = {}
        """Monitor results of the last measured step (``{point: {...}}``)."""
        self._attached = False
        self._measuring_step: int | None = None  # the step whose micro-batches are measured
        self._pending: tuple[int, dict[str, float]] | None = None  # (step, logs) to add
        self._warned_order = False

    @property
    def alert_fired(self) -> Alert | None:
        """The alert that fired this run, if any."""
        return None if self.alert is None else self.alert.fired

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
        from outlierlab.monitor import OutlierMonitor

        if model is None:
            raise ConfigError("OutlierCallback needs the model: use it inside transformers.Trainer")
        self.close()
        self.monitor = OutlierMonitor(
            model, points=self.points, every=1, cos_max_tokens=self.cos_max_tokens, seed=self.seed
        )
        self.monitor.__enter__()
        self.monitor.enabled = False
        if self.alert is not None:
            self.alert.reset()
        self._pending = None
        self._measuring_step = None

    def on_step_begin(self, args, state, control, **kwargs):
        # Called before the first micro-batch of optimiser step state.global_step + 1; the
        # monitor stays on through every micro-batch until on_step_end.
        step = state.global_step + 1
        if self.monitor is not None and step % self.every == 0:
            self.monitor.reset()
            self.monitor.enabled = True
            self._measuring_step = step

    def on_step_end(self, args, state, control, **kwargs):
        if self.monitor is None or self._measuring_step is None:
            return
        self.monitor.enabled = False
        self._measuring_step = None
        results = self.monitor.results(all_reduce=_distributed())
        summary = self.monitor.summary(results)
        self.monitor.reset()
        if not results:
            return
        self.last_results = results
        self._pending = (
            state.global_step,
            flatten_results(results, summary, prefix=self.prefix, per_layer=self.per_layer),
        )
        if self.alert is not None and state.is_world_process_zero:
            self.alert.check(results, step=state.global_step)
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

    def close(self) -> None:
        """Remove the monitor's hooks (idempotent; call it if training raised)."""
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            monitor.close()
        self._measuring_step = None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _reports(args: Any) -> bool:
    report_to = getattr(args, "report_to", None) or []
    if isinstance(report_to, str):
        report_to = [report_to]
    return any(r not in ("none", None) for r in report_to)
