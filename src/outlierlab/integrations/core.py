"""What the framework callbacks share: settings, the monitor's life cycle, one measured step.

`MeasuringCallback` is framework-free; `integrations.hf` and `integrations.lightning` mix it
into their framework's callback class and only translate events (which step begins, where the
metrics go).
"""

from __future__ import annotations

from typing import Any

from outlierlab.errors import ConfigError
from outlierlab.integrations import flatten_results
from outlierlab.integrations.alert import Alert, OutlierAlert


class MeasuringCallback:
    """Measure the residual stream on every ``every``-th optimiser step (1-based)."""

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
        self._measuring_step: int | None = None  # the step whose micro-batches are measured

    @property
    def alert_fired(self) -> Alert | None:
        """The alert that fired this run, if any."""
        return None if self.alert is None else self.alert.fired

    def _open(self, model: Any) -> None:
        """Hook ``model`` (switched off until a measured step begins) for a new run."""
        from outlierlab.monitor import OutlierMonitor

        self.close()
        self.monitor = OutlierMonitor(
            model, points=self.points, every=1, cos_max_tokens=self.cos_max_tokens, seed=self.seed
        )
        self.monitor.__enter__()
        self.monitor.enabled = False
        if self.alert is not None:
            self.alert.reset()

    def _begin_step(self, step: int) -> None:
        """Optimiser step ``step`` begins: measure all its micro-batches if it is due."""
        if self.monitor is not None and self._measuring_step is None and step % self.every == 0:
            self.monitor.reset()
            self.monitor.enabled = True
            self._measuring_step = step

    def _end_step(self, all_reduce: bool, alert: bool) -> tuple[int, dict[str, float]] | None:
        """The measured step has finished: ``(step, flat metrics)``, or None if nothing was
        measured. ``all_reduce`` sums the statistics over ranks; ``alert`` runs the alert
        (rank zero only)."""
        if self.monitor is None or self._measuring_step is None:
            return None
        step, self._measuring_step = self._measuring_step, None
        self.monitor.enabled = False
        results = self.monitor.results(all_reduce=all_reduce)
        summary = self.monitor.summary(results)
        self.monitor.reset()
        if not results:
            return None
        self.last_results = results
        if self.alert is not None and alert:
            self.alert.check(results, step=step)
        return step, flatten_results(results, summary, prefix=self.prefix, per_layer=self.per_layer)

    def close(self) -> None:
        """Remove the monitor's hooks (idempotent; call it if training raised)."""
        if self.monitor is not None:
            monitor, self.monitor = self.monitor, None
            monitor.close()
        self._measuring_step = None
