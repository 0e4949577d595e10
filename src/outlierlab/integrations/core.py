"""What the framework callbacks share: settings, alert, flat log names; which steps are
measured and the monitor's life cycle are :class:`outlierlab.measuring.MeasureEvery`'s.

`MeasuringCallback` is framework-free; `integrations.hf` and `integrations.lightning` mix it
into their framework's callback class and only translate events (which step begins, where the
metrics go).
"""

from __future__ import annotations

from typing import Any

from outlierlab.errors import ConfigError
from outlierlab.integrations import flatten_results
from outlierlab.integrations.alert import Alert, OutlierAlert
from outlierlab.measuring import MeasureEvery


class MeasuringCallback:
    """Measure the residual stream on every ``every``-th optimiser step (1-based), through
    :class:`outlierlab.measuring.MeasureEvery`."""

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
        self.measure = MeasureEvery(every, points=points, cos_max_tokens=cos_max_tokens,
                                    seed=seed)  # fmt: skip
        self.prefix = prefix
        self.per_layer = per_layer
        self.alert = None if alert_kurtosis is None else OutlierAlert(alert_kurtosis)
        self.last_results: dict[str, dict[str, Any]] = {}
        """Monitor results of the last measured step (``{point: {...}}``)."""

    @property
    def every(self) -> int:
        return self.measure.every

    @property
    def points(self) -> str | list[str]:
        return self.measure.points

    @property
    def monitor(self):
        """The hooked :class:`~outlierlab.monitor.OutlierMonitor` while training (else None)."""
        return self.measure.monitor

    @property
    def _measuring_step(self) -> int | None:
        """The step whose micro-batches are being measured, if any."""
        return self.measure.measuring

    @property
    def alert_fired(self) -> Alert | None:
        """The alert that fired this run, if any."""
        return None if self.alert is None else self.alert.fired

    def _open(self, model: Any) -> None:
        """Hook ``model`` (switched off until a measured step begins) for a new run."""
        self.measure.open(model)
        if self.alert is not None:
            self.alert.reset()

    def _begin_step(self, step: int) -> None:
        """Optimiser step ``step`` begins: measure all its micro-batches if it is due."""
        self.measure.begin_step(step)

    def _end_step(self, all_reduce: bool, alert: bool) -> tuple[int, dict[str, float]] | None:
        """The measured step has finished: ``(step, flat metrics)``, or None if nothing was
        measured. ``all_reduce`` sums the statistics over ranks; ``alert`` runs the alert
        (rank zero only)."""
        measured = self.measure.end_step(all_reduce=all_reduce)
        if measured is None:
            return None
        self.last_results = measured.results
        if self.alert is not None and alert:
            self.alert.check(measured.results, step=measured.step)
        flat = flatten_results(measured.results, measured.summary, prefix=self.prefix,
                               per_layer=self.per_layer)  # fmt: skip
        return measured.step, flat

    def close(self) -> None:
        """Remove the monitor's hooks (idempotent; call it if training raised)."""
        self.measure.close()
