"""Outlier features inside a torchtitan ``Trainer`` (docs/integrations.md).

torchtitan (PyTorch's distributed training engine) has no per-channel activation statistics of
its own. :func:`attach` adds outlierlab's monitor to a built trainer, without a subclass and
without importing torchtitan:

- the residual stream (science §1 "Where") of ``trainer.model_parts[0]`` is hooked: the output
  of ``tok_embeddings`` as block 0 sees it, then each block of ``layers`` (torchtitan keeps them
  in an ``nn.ModuleDict`` keyed ``"0"``, ``"1"``, …);
- optimiser step s (``trainer.step``, 1-based, already advanced when ``train_step`` runs) is
  measured when ``s % every == 0``, over every micro-batch of the step (gradient accumulation),
  the rule of :class:`outlierlab.measuring.MeasureEvery`;
- under data parallelism (FSDP2 / HSDP / DDP) each rank measures its batch and the statistics
  are all-reduced over the default process group (exact Kurt of the union), with subsample seeds
  from the global micro-batch, so the numbers do not depend on the rank count;
- Kurt (Eq. 1), MMR (Eq. 2), token cos-sim, per layer and mean / max, go to the trainer's
  metrics processor's loggers (``trainer.metrics_processor.logger.log(metrics, step)``: its
  TensorBoard / W&B loggers, on the ranks torchtitan logs from) at the measured step.

Tensor and pipeline parallelism are refused (a tensor-parallel rank holds a shard of each
activation; a pipeline stage only some blocks). Import cost: none beyond outlierlab and torch.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from outlierlab.errors import ConfigError
from outlierlab.integrations.core import MeasuringCallback

__all__ = ["TitanMonitor", "attach"]

log = logging.getLogger("outlierlab")


def attach(trainer: Any, every: int = 100, **kwargs: Any) -> TitanMonitor:
    """Measure ``trainer`` (a built ``torchtitan.trainer.Trainer``) every ``every`` optimiser
    steps from its next ``train_step`` on; returns the :class:`TitanMonitor` (``.history``,
    ``.last_results``, ``.detach()``). The other arguments are
    :class:`~outlierlab.integrations.core.MeasuringCallback`'s: ``points``, ``alert_kurtosis``,
    ``prefix``, ``per_layer``, ``cos_max_tokens``, ``seed``."""
    return TitanMonitor(trainer, every, **kwargs)


class TitanMonitor(MeasuringCallback):
    """The monitor attached to one torchtitan trainer by wrapping its ``train_step`` (and
    ``close``, which removes the hooks) on the instance."""

    def __init__(self, trainer: Any, every: int = 100, **kwargs: Any) -> None:
        MeasuringCallback.__init__(self, every, **kwargs)
        for attr in ("model_parts", "metrics_processor", "step", "train_step"):
            if not hasattr(trainer, attr):
                raise ConfigError(f"attach: {type(trainer).__name__} has no {attr!r}; allowed: "
                                  "a built torchtitan Trainer (model_parts, metrics_processor, "
                                  "step, train_step)")
        parts = list(trainer.model_parts)
        dims = getattr(trainer, "parallel_dims", None)
        for flag, what, why in (("pp_enabled", "pipeline", "only some blocks"),
                                ("tp_enabled", "tensor", "a shard of each activation")):
            if getattr(dims, flag, False):
                raise ConfigError(f"attach: {what} parallelism is not supported (a rank sees "
                                  f"{why}); allowed: data parallelism (FSDP, HSDP, DDP) or "
                                  "one device")
        if len(parts) != 1:
            raise ConfigError(f"attach: the trainer has {len(parts)} model parts; allowed: one "
                              "(no pipeline parallelism)")
        self.trainer = trainer
        self.history: list[tuple[int, dict[str, float]]] = []
        """``(step, flat metrics)`` of every measured step."""
        self._open(parts[0])
        self._own = {n: vars(trainer)[n] for n in ("train_step", "close") if n in vars(trainer)}
        self._train_step = trainer.train_step
        self._close = getattr(trainer, "close", None)
        trainer.train_step = self._wrapped_step
        if self._close is not None:
            trainer.close = self._wrapped_close

    def _wrapped_step(self, *args: Any, **kwargs: Any) -> Any:
        step = int(self.trainer.step)
        dist = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = torch.distributed.get_rank() if dist else 0
        world = torch.distributed.get_world_size() if dist else 1
        self.measure.begin_step(step, rank, world)
        try:
            out = self._train_step(*args, **kwargs)
        except BaseException:
            with contextlib.suppress(Exception):
                self.measure.end_step()  # a failed step is neither measured nor logged
            raise
        done = self._end_step(all_reduce=dist and world > 1, alert=rank == 0)
        if done is not None:
            s, flat = done
            self.history.append((s, flat))
            self.trainer.metrics_processor.logger.log(flat, s)
            if rank == 0:
                log.info("step %d: outliers kurtosis_max %.3g, mmr_mean %.3g", s,
                         flat.get(f"{self.prefix}kurtosis_max", float("nan")),
                         flat.get(f"{self.prefix}mmr_mean", float("nan")))
        return out

    def _wrapped_close(self) -> Any:
        self.close()
        return self._close() if self._close is not None else None

    def detach(self) -> None:
        """Remove the hooks and give the trainer back its own ``train_step`` and ``close``."""
        self.close()
        for name in ("train_step", "close"):
            if name in self._own:
                setattr(self.trainer, name, self._own[name])  # what the instance had
            elif name in vars(self.trainer):
                delattr(self.trainer, name)  # the class's own method again
