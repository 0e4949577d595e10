"""Outlier features inside a Lightning ``Trainer`` (docs/integrations.md).

`OutlierCallback` measures the residual stream (science §1 "Where") on the training batch of every
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
from outlierlab.integrations.core import MeasuringCallback

__all__ = ["OutlierCallback"]


class OutlierCallback(Callback, MeasuringCallback):
    """Log outlier-feature metrics every ``every`` optimiser steps of a Lightning run.

    ``model_attr`` names the attribute of the LightningModule that holds the network to
    measure (e.g. ``"model"`` for ``self.model = GPT2LMHeadModel(...)``); None measures the
    LightningModule itself or, with ``points="auto"``, the one child network whose residual
    stream outlierlab knows (an outlierlab ``GPT`` or a Hugging Face family).

    Optimiser step s (1-based: ``trainer.global_step`` once it is done) is measured when
    ``s % every == 0`` and written to the loggers at logger step s − 1, where Lightning writes
    that step's own metrics (its loss), so the curves line up.
    """

    def __init__(self, every: int = 100, model_attr: str | None = None, **kwargs: Any) -> None:
        """``model_attr`` as above; the other arguments are `MeasuringCallback`'s: ``every``,
        ``points``, ``alert_kurtosis``, ``prefix``, ``per_layer``, ``cos_max_tokens``,
        ``seed``."""
        MeasuringCallback.__init__(self, every, **kwargs)
        self.model_attr = model_attr
        self.history: list[tuple[int, dict[str, float]]] = []
        """``(step, flat metrics)`` of every measured step of this run."""

    def on_train_start(self, trainer, pl_module) -> None:
        self._open(self._target(pl_module))
        self.history = []

    def _target(self, pl_module: Any) -> Any:
        """The module to measure: ``model_attr``, else the LightningModule itself, else (with
        ``points="auto"``) its only child whose residual points are known."""
        if self.model_attr is not None:
            target = getattr(pl_module, self.model_attr, None)
            if target is None:
                raise ConfigError(
                    f"model_attr={self.model_attr!r}: the LightningModule has no such attribute"
                )
            return target
        if self.points != "auto" or _known(pl_module):
            return pl_module
        # Lightning calls training_step, not the module's forward: measure the network inside
        known = [c for c in pl_module.children() if _known(c)]
        return known[0] if len(known) == 1 else pl_module  # else the monitor says what is wrong

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # Every micro-batch of one optimiser step sees the same global_step; the first one of
        # a step to be measured switches the monitor on until that step has completed.
        self._begin_step(trainer.global_step + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._measuring_step is None or trainer.global_step < self._measuring_step:
            return  # not measuring, or still accumulating micro-batches of the measured step
        measured = self._end_step(all_reduce=trainer.world_size > 1, alert=trainer.is_global_zero)
        if measured is None:
            return
        step, metrics = measured
        self.history.append((step, metrics))
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, logger=False, batch_size=1)
        for logger in trainer.loggers:  # rank-zero only, by Lightning's own decorator
            logger.log_metrics(metrics, step=step - 1)

    def on_train_end(self, trainer, pl_module) -> None:
        self.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.close()


def _known(module: Any) -> bool:
    """Whether ``module``'s residual stream is known, not guessed (a LightningModule holding a
    network is not itself one: its block list would be the network's, its forward unused)."""
    from outlierlab.structure import StructureError, discover

    try:
        return discover(module).source != "guessed"
    except StructureError:
        return False
