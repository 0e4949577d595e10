"""Outlier features inside a Lightning ``Trainer`` (docs/integrations.md).

`OutlierCallback` measures the residual stream (SPEC §1 "Where") on the training batch of every
``every``-th optimiser step — all micro-batches of that step under ``accumulate_grad_batches`` —
and logs Kurt (Eq. 1), MMR (Eq. 2) and token cos-sim, per layer and mean / max:

- to every logger in ``trainer.loggers`` (TensorBoard, W&B, CSV, ...) at exactly the measured
  steps, whatever ``log_every_n_steps`` is (``pl_module.log_dict`` would re-send the last value
  on later steps and drop steps off that grid);
- with ``pl_module.log_dict(..., logger=False)`` into ``trainer.callback_metrics``, so
  ``EarlyStopping`` or ``ModelCheckpoint`` can watch ``outliers/kurtosis_max``.

Requires ``lightning`` (``pip install 'outlierlab[lightning]'``); ``pytorch_lightning`` is used
when ``lightning`` is absent.
"""

from __future__ import annotations

from typing import Any

try:
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover - depends on what is installed
    try:
        from pytorch_lightning.callbacks import Callback
    except ImportError as exc:
        raise ImportError(
            "outlierlab.integrations.lightning needs Lightning: pip install 'outlierlab[lightning]'"
        ) from exc

from outlierlab.errors import ConfigError
from outlierlab.integrations import flatten_results
from outlierlab.integrations.alert import Alert, OutlierAlert

__all__ = ["OutlierCallback"]


class OutlierCallback(Callback):
    """Log outlier-feature metrics every ``every`` optimiser steps of a Lightning run.

    ``model_attr`` names the attribute of the LightningModule that holds the network to
    measure (e.g. ``"model"`` for ``self.model = GPT2LMHeadModel(...)``); None measures the
    LightningModule itself or, with ``points="auto"``, the one child network whose residual
    stream outlierlab knows (an outlierlab ``GPT`` or a Hugging Face family).

    Optimiser step s (1-based: ``trainer.global_step`` once it is done) is measured when
    ``s % every == 0`` and written to the loggers at logger step s − 1, where Lightning writes
    that step's own metrics (its loss), so the curves line up.
    """

    def __init__(
        self,
        every: int = 100,
        points: str | list[str] = "auto",
        alert_kurtosis: float | None = None,
        prefix: str = "outliers/",
        per_layer: bool = True,
        model_attr: str | None = None,
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
        self.model_attr = model_attr
        self.cos_max_tokens = cos_max_tokens
        self.seed = seed
        self.alert = None if alert_kurtosis is None else OutlierAlert(alert_kurtosis)
        self.monitor = None
        self.last_results: dict[str, dict[str, Any]] = {}
        """Monitor results of the last measured step (``{point: {...}}``)."""
        self.history: list[tuple[int, dict[str, float]]] = []
        """``(step, flat metrics)`` of every measured step of this run."""
        self._measuring_step: int | None = None

    @property
    def alert_fired(self) -> Alert | None:
        """The alert that fired this run, if any."""
        return None if self.alert is None else self.alert.fired

    def on_train_start(self, trainer, pl_module) -> None:
        from outlierlab.monitor import OutlierMonitor

        target = self._target(pl_module)
        self.close()
        self.monitor = OutlierMonitor(
            target, points=self.points, every=1, cos_max_tokens=self.cos_max_tokens, seed=self.seed
        )
        self.monitor.__enter__()
        self.monitor.enabled = False
        self.history = []
        if self.alert is not None:
            self.alert.reset()

    def _target(self, pl_module: Any) -> Any:
        """The module to measure: ``model_attr``, else the LightningModule itself, else (with
        ``points="auto"``) its only child whose residual points are known."""
        from outlierlab.monitor import auto_points

        if self.model_attr is not None:
            target = getattr(pl_module, self.model_attr, None)
            if target is None:
                raise ConfigError(
                    f"model_attr={self.model_attr!r}: the LightningModule has no such attribute"
                )
            return target
        if self.points != "auto" or auto_points(pl_module) is not None:
            return pl_module
        known = [c for c in pl_module.children() if auto_points(c) is not None]
        return known[0] if len(known) == 1 else pl_module  # else the monitor says what is wrong

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Every micro-batch of one optimiser step sees the same global_step; the first one of
        # a step to be measured switches the monitor on until that step has completed.
        step = trainer.global_step + 1
        if self.monitor is not None and self._measuring_step is None and step % self.every == 0:
            self.monitor.reset()
            self.monitor.enabled = True
            self._measuring_step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is None or self._measuring_step is None:
            return
        if trainer.global_step < self._measuring_step:
            return  # still accumulating micro-batches of the measured step
        step, self._measuring_step = self._measuring_step, None
        self.monitor.enabled = False
        results = self.monitor.results(all_reduce=trainer.world_size > 1)
        summary = self.monitor.summary(results)
        self.monitor.reset()
        if not results:
            return
        self.last_results = results
        metrics = flatten_results(results, summary, prefix=self.prefix, per_layer=self.per_layer)
        self.history.append((step, metrics))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False, batch_size=1)
        for logger in trainer.loggers:  # rank-zero only, by Lightning's own decorator
            logger.log_metrics(metrics, step=step - 1)
        if self.alert is not None and trainer.is_global_zero:
            self.alert.check(results, step=step)

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()

    def close(self) -> None:
        """Remove the monitor's hooks (idempotent)."""
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            monitor.close()
        self._measuring_step = None
