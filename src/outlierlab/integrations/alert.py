"""Threshold alerting on monitor results: the early warning before a model is ruined for int8.

`OutlierAlert` is pure: it reads the dict that `OutlierMonitor.results()` returns
(``{point: {"kurtosis": ..., "outlier_neurons": ..., ...}}``, model order) and, the first time
any point's Kurt (science §1, paper Eq. 1) exceeds the threshold, logs ONE warning on the
``logging.getLogger("outlierlab")`` logger naming the step, the worst layer, its value and its
top outlier neuron indices. It stays silent for the rest of the run (until `reset()`).

Why `logging` and not `warnings`: training code already routes `logging` to files, consoles
and experiment trackers, and Python's last-resort handler still prints a WARNING to stderr when
nothing is configured; `warnings` would de-duplicate by source line and can be silenced by
unrelated filters.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from outlierlab.errors import ConfigError

LOGGER_NAME = "outlierlab"


@dataclass(frozen=True)
class Alert:
    """One fired alert: what crossed the threshold, where and when."""

    step: int
    """Optimiser step (1-based) whose batch was measured."""
    point: str
    """Measurement point with the largest Kurt (e.g. ``blocks.3.resid_post``)."""
    kurtosis: float
    """Its Kurt (Eq. 1)."""
    threshold: float
    neurons: tuple[int, ...]
    """Top outlier neuron indices at that point (largest RMS first), at most ``top_k``."""
    also: tuple[str, ...] = ()
    """Other points above the threshold at the same step, in model order."""

    def message(self) -> str:
        """One line for a log: step, layer, value, threshold, neurons, other layers."""
        neurons = ", ".join(str(i) for i in self.neurons) or "none found"
        text = (
            f"outlier features: kurtosis {self.kurtosis:.4g} > {self.threshold:g} at step "
            f"{self.step} in {self.point}; top outlier neurons [{neurons}]"
        )
        if self.also:
            text += f"; also above threshold: {', '.join(self.also)}"
        return text


def neuron_indices(value: Any) -> tuple[int, ...]:
    """Neuron indices from a result's ``outlier_neurons`` entry.

    Accepts a sequence of ints, of ``(index, ...)`` tuples, or of dicts with an ``"index"`` key,
    or a dict with an ``"indices"`` key; anything else gives ``()``.
    """
    if isinstance(value, Mapping):
        value = value.get("indices", ())
    if not isinstance(value, Sequence) or isinstance(value, str):
        try:  # a tensor or array
            value = value.tolist()
        except AttributeError:
            return ()
    out: list[int] = []
    for item in value:
        if isinstance(item, Mapping):
            item = item.get("index")
        elif isinstance(item, Sequence) and not isinstance(item, str):
            item = item[0] if item else None
        if item is None:
            continue
        out.append(int(item))
    return tuple(out)


@dataclass
class OutlierAlert:
    """Warn once per run when any measured layer's Kurt exceeds ``kurtosis_threshold``.

    >>> alert = OutlierAlert(kurtosis_threshold=10.0)
    >>> alert.check({"blocks.0.resid_post": {"kurtosis": 1.2}}, step=100) is None
    True
    """

    kurtosis_threshold: float = 10.0
    """Fire when Kurt > this in any point. Kurt ≥ 1 always (≈ 1 at init), so it must be > 1."""
    top_k: int = 5
    """How many outlier neuron indices the message names."""
    logger_name: str = LOGGER_NAME
    fired: Alert | None = field(default=None, init=False)
    """The alert that fired this run, or None."""

    def __post_init__(self) -> None:
        t = self.kurtosis_threshold
        is_number = isinstance(t, (int, float)) and not isinstance(t, bool)
        if not (is_number and math.isfinite(t) and t > 1):
            raise ConfigError(
                f"kurtosis_threshold must be a finite number > 1 (Kurt ≥ 1 always), got {t!r}"
            )
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ConfigError(f"top_k must be an integer ≥ 1, got {self.top_k!r}")

    def check(self, results: Mapping[str, Mapping[str, Any]], step: int) -> Alert | None:
        """Return and log the alert the first time a point's Kurt exceeds the threshold.

        Returns None when nothing crosses it, or when an alert already fired this run.
        NaN values never fire (a diverged run is not an outlier-feature signal).
        """
        if self.fired is not None:
            return None
        above = [
            (name, float(r["kurtosis"]))
            for name, r in results.items()
            if r.get("kurtosis") is not None and float(r["kurtosis"]) > self.kurtosis_threshold
        ]
        if not above:
            return None
        point, value = max(above, key=lambda nv: nv[1])
        self.fired = Alert(
            step=int(step),
            point=point,
            kurtosis=value,
            threshold=float(self.kurtosis_threshold),
            neurons=neuron_indices(results[point].get("outlier_neurons", ()))[: self.top_k],
            also=tuple(name for name, _ in above if name != point),
        )
        logging.getLogger(self.logger_name).warning(self.fired.message())
        return self.fired

    def reset(self) -> None:
        """Arm again (a new run)."""
        self.fired = None
