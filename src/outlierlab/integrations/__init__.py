"""Watch outlier features inside the training loops people already use (docs/integrations.md).

- `outlierlab.integrations.hf.OutlierCallback`: a ``transformers.TrainerCallback``
  (extra ``outlierlab[hf]``).
- `outlierlab.integrations.lightning.OutlierCallback`: a Lightning ``Callback``
  (extra ``outlierlab[lightning]``).
- `outlierlab.integrations.torchtitan.attach`: the monitor on a torchtitan ``Trainer`` (no
  torchtitan import).
- `OutlierAlert`: warn once when any layer's Kurt exceeds a threshold (pure, no framework).

Importing this package imports neither transformers nor lightning; only the submodule you
use imports its framework.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from outlierlab.integrations.alert import Alert, OutlierAlert

__all__ = ["Alert", "OutlierAlert", "flatten_results"]

#: Per-point result keys that become per-layer log entries (``{prefix}{key}/{point}``).
PER_POINT_KEYS = ("kurtosis", "mmr", "cos_sim", "kurtosis_authors", "corr_authors")


def flatten_results(
    results: Mapping[str, Mapping[str, Any]],
    summary: Mapping[str, Any],
    prefix: str = "outliers/",
    per_layer: bool = True,
) -> dict[str, float]:
    """Flat ``{name: float}`` for a logger from `OutlierMonitor.results()` and `.summary()`.

    ``{prefix}kurtosis_mean`` / ``kurtosis_max`` / ``mmr_mean`` / ``cos_sim_mean`` (the summary),
    ``{prefix}tokens`` (tokens measured at the first point) and, with ``per_layer``,
    ``{prefix}kurtosis/{point}``, ``{prefix}mmr/{point}``, ``{prefix}cos_sim/{point}``,
    ``{prefix}kurtosis_authors/{point}``, ``{prefix}corr_authors/{point}`` (science §1 [code]).
    Values that are None are left out; NaN is kept (a logger shows the gap).
    """
    out: dict[str, float] = {}
    for key, value in summary.items():
        if _is_number(value):
            out[f"{prefix}{key}"] = float(value)
    first = next(iter(results.values()), None)
    if first is not None and _is_number(first.get("tokens")):
        out[f"{prefix}tokens"] = float(first["tokens"])
    if per_layer:
        for key in PER_POINT_KEYS:
            for point, r in results.items():
                if _is_number(r.get(key)):
                    out[f"{prefix}{key}/{point}"] = float(r[key])
    return out


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or value is None:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
