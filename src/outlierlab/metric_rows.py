"""The schema of a ``metrics.jsonl`` row: one typed definition of every field a row can hold
(its name, meaning and unit), used by the writers (the trainer, the monitor through
:class:`~outlierlab.measuring.Measured`, the profile, the sinks) and the readers
(``outlierlab runs``, :mod:`outlierlab.experiments.results`, the report).

A row is one JSON object per logged step. Scalars are numbers; ``per="point"`` fields are
``{monitor point: value}`` (the residual stream, science §1), ``per="layer"`` fields
``{attention layer: value}``. Every field the monitor writes is also written with the prefix
``val_`` by the evaluation (:meth:`~outlierlab.train.Trainer.validate`): the same statistic
on the fixed held-out validation windows instead of the training batch.

:func:`final_kurtosis` is the one answer to "the run's final Kurt": the held-out value logged
at the run's last step when there is one, else the last training batch measured; ``runs`` and
``report`` both print it and say which it is.

Imports nothing of outlierlab's (``outlierlab runs`` stays fast).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MetricField:
    """One field of a metrics row."""

    name: str
    meaning: str
    unit: str = ""  # "" for a dimensionless ratio or statistic
    per: str = ""  # "" (a scalar), "point" (per monitor point) or "layer" (per attention layer)
    writer: str = "trainer"  # trainer, monitor or profile


_FIELDS = (
    # -- the trainer (every logged step) --------------------------------------------------------
    MetricField("step", "optimiser steps done (0: before the first update)", "steps"),
    MetricField("tokens", "training tokens seen so far, all ranks", "tokens"),
    MetricField("loss", "mean next-token cross-entropy of the step's training batch", "nats"),
    MetricField("lr", "learning rate of the step (first parameter group)"),
    MetricField("grad_norm", "global gradient L2 norm before clipping"),
    MetricField("tokens_per_s", "training throughput since the previous row, evaluation and "
                "checkpoint time left out", "tokens/s"),
    MetricField("loss_penalty", "TWEO's λ·penalty added to the loss (train.tweo_weight)", "nats"),
    MetricField("val_loss", "mean cross-entropy on the fixed validation windows", "nats"),
    MetricField("val_ppl", "exp(val_loss)"),
    # -- the monitor (log.kurtosis_every; science §1) ------------------------------------------
    MetricField("kurtosis", "Kurt = mean_j s_j⁴ / (mean_j s_j²)² of the per-channel RMS s "
                "(science §1, Eq. 1)", per="point", writer="monitor"),
    MetricField("kurtosis_mean", "mean over points of kurtosis", writer="monitor"),
    MetricField("kurtosis_max", "largest over points of kurtosis", writer="monitor"),
    MetricField("mmr", "max-median ratio of the activations' absolute values (science §1)",
                per="point", writer="monitor"),
    MetricField("cos_sim", "mean off-diagonal cosine similarity between tokens' activations "
                "(science §1)", per="point", writer="monitor"),
    MetricField("kurtosis_authors", "the authors' kurtosis variant (science §1)", per="point",
                writer="monitor"),
    MetricField("corr_authors", "the authors' signal-propagation correlation (science §1)",
                per="point", writer="monitor"),
    MetricField("attn_entropy", "mean attention entropy of the layer", "nats", per="layer",
                writer="monitor"),
    MetricField("attn_entropy_min", "smallest attn_entropy over layers", "nats",
                writer="monitor"),
    # -- the massive-activation profile (log.profile_every) ------------------------------------
    MetricField("massive_max", "largest |activation|", per="point", writer="profile"),
    MetricField("massive_ratio", "max / median of |activation| over the tensor", per="point",
                writer="profile"),
    MetricField("kurtosis_no_first", "Kurt without token 0", per="point", writer="profile"),
    MetricField("sink_share", "share of heads putting more than half their mass on token 0",
                per="layer", writer="profile"),
    MetricField("sink_mass", "mean attention mass on token 0", per="layer", writer="profile"),
)

VAL_PREFIX = "val_"
"""The evaluation's copy of a monitor field: the same statistic on the validation windows."""

FIELDS: dict[str, MetricField] = {f.name: f for f in _FIELDS}
FIELDS.update({
    VAL_PREFIX + f.name: MetricField(VAL_PREFIX + f.name, f.meaning + ", on the held-out "
                                     "validation windows", f.unit, f.per, "trainer")
    for f in _FIELDS if f.writer == "monitor"
})
"""Every field a row can hold, by name."""

MONITOR_POINT_FIELDS = tuple(f.name for f in _FIELDS if f.writer == "monitor" and f.per)
"""The per-point / per-layer fields of a monitor step (``kurtosis``, ``mmr``, ...)."""

HELD_OUT = "held-out eval"
TRAIN_BATCH = "last train batch"


def unknown_fields(row: Mapping[str, Any]) -> list[str]:
    """The keys of ``row`` that the schema does not define."""
    return sorted(k for k in row if k not in FIELDS)


@dataclass(frozen=True)
class FinalKurtosis:
    """A run's final Kurt (mean and max over the measured points), the step it was measured at
    and where: :data:`HELD_OUT` or :data:`TRAIN_BATCH` (``source`` is "" when never measured)."""

    mean: float = math.nan
    max: float = math.nan
    step: int | None = None
    source: str = ""


def final_kurtosis(rows: Iterable[Mapping[str, Any]]) -> FinalKurtosis:
    """The held-out Kurt logged at the last step of ``rows`` (``val_kurtosis_mean`` / ``_max``,
    measured by the final evaluation), else the last training batch measured
    (``kurtosis_mean`` / ``_max``)."""
    finals: dict[str, tuple[int, float]] = {}
    last_step = -1
    for row in rows:
        step = row.get("step")
        if not isinstance(step, int):
            continue
        last_step = max(last_step, step)
        finals.update({k: (step, x) for k in _KURT if (x := _number(row.get(k))) is not None})
    return final_kurtosis_of(finals, last_step)


_KURT = ("val_kurtosis_mean", "val_kurtosis_max", "kurtosis_mean", "kurtosis_max")


def final_kurtosis_of(finals: Mapping[str, tuple[int, float]], last_step: int) -> FinalKurtosis:
    """:func:`final_kurtosis` from the last logged ``(step, value)`` of each field and the
    run's last step (what :class:`~outlierlab.experiments.results.RunRecord` keeps)."""
    held = finals.get("val_kurtosis_mean")
    if held is not None and held[0] == last_step >= 0:
        top = finals.get("val_kurtosis_max", (-1, math.nan))
        return FinalKurtosis(held[1], top[1] if top[0] == last_step else math.nan, last_step,
                             HELD_OUT)
    train = finals.get("kurtosis_mean")
    if train is not None:
        top = finals.get("kurtosis_max", (-1, math.nan))
        return FinalKurtosis(train[1], top[1] if top[0] == train[0] else math.nan, train[0],
                             TRAIN_BATCH)
    return FinalKurtosis()


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None

