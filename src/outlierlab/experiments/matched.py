"""Kurt at matched validation loss (issue 23; docs/reproduce.md "Verdicts"): two runs of one
seed are compared at the same validation loss L along their training trajectories, not at
their ends within a tolerance.

Each run's trajectory is its (validation loss, held-out mean Kurt) at every evaluation
(:meth:`RunRecord.trajectory`, science §1 Eq. 1 on the held-out windows). For a same-seed pair
L is the worse (larger) of the two final losses; each run's Kurt at L is interpolated linearly
in loss between the two evaluations that bracket L (the latest such segment, so the worse run
is read at its end). When L lies outside a trajectory's loss range the pair has no value (it is
named, never extrapolated). The outcome at L is Kurt growth Kurt(L) − Kurt₀ when the runs
have a step-0 Kurt, else Kurt(L) itself (as :func:`.claims.outcome_metric`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from outlierlab.experiments.results import RunRecord

MIN_POINTS = 2
"""Evaluations with held-out Kurt a run needs to have a trajectory."""


def kurt_at_loss(loss: Sequence[float], kurt: Sequence[float], target: float) -> float:
    """Kurt at validation loss ``target`` along a trajectory (evaluations in step order): linear
    in loss between the latest pair of consecutive evaluations whose losses bracket ``target``;
    nan when ``target`` is outside every such segment (no extrapolation)."""
    loss, kurt = np.asarray(loss, dtype=float), np.asarray(kurt, dtype=float)
    if not loss.size or not math.isfinite(target):
        return math.nan
    if loss[-1] == target:
        return float(kurt[-1])
    for i in range(len(loss) - 2, -1, -1):
        a, b = loss[i], loss[i + 1]
        if min(a, b) <= target <= max(a, b):
            w = (target - a) / (b - a) if b != a else 1.0
            return float(kurt[i] + w * (kurt[i + 1] - kurt[i]))
    return math.nan


def has_trajectory(r: RunRecord) -> bool:
    """Whether ``r`` logged held-out Kurt with the validation loss at ≥ MIN_POINTS evaluations."""
    return r.trajectory()[0].size >= MIN_POINTS


def outcome_at(r: RunRecord, kurt: float, growth: bool) -> float:
    """Kurt growth from step 0 at Kurt ``kurt`` (``growth``), else ``kurt``."""
    if not growth:
        return kurt
    s = r.kurt_mean_series
    return kurt - (float(s[0]) if s.size else math.nan)


@dataclass
class MatchedCell:
    """One cell's same-seed pairs at matched loss."""

    diffs: dict[Any, float]
    """``{seed: outcome_high(L) − outcome_low(L)}`` for the seeds with a value."""
    points: dict[Any, dict[str, float]]
    """Per seed: ``loss`` (L), ``kurt_low``, ``kurt_high`` (Kurt at L)."""
    missing: list[str]
    """Why a seed pair has no value (L outside a trajectory, no trajectory)."""

    def mean(self, side: str) -> float:
        v = [p[side] for p in self.points.values() if math.isfinite(p[side])]
        return float(np.mean(v)) if v else math.nan


def matched_cell(low: Sequence[RunRecord], high: Sequence[RunRecord],
                 growth: bool) -> MatchedCell:
    """The same-seed pairs of ``low`` and ``high`` runs compared at matched loss (module
    docstring)."""
    lo, hi = {r.seed: r for r in low}, {r.seed: r for r in high}
    diffs, points, missing = {}, {}, []
    for s in (s for s in lo if s in hi):
        a, b = lo[s], hi[s]
        (la, ka), (lb, kb) = a.trajectory(), b.trajectory()
        if la.size < MIN_POINTS or lb.size < MIN_POINTS:
            short = [r.name for r, n in ((a, la.size), (b, lb.size)) if n < MIN_POINTS]
            missing.append(f"seed {s}: no held-out Kurt trajectory in {', '.join(short)}")
            continue
        target = max(float(la[-1]), float(lb[-1]))
        k_lo, k_hi = kurt_at_loss(la, ka, target), kurt_at_loss(lb, kb, target)
        points[s] = {"loss": target, "kurt_low": k_lo, "kurt_high": k_hi}
        out = [(r, k, lv) for r, k, lv in ((a, k_lo, la), (b, k_hi, lb)) if math.isnan(k)]
        if out:
            missing.append(f"seed {s}: loss {target:.3f} outside " + ", ".join(
                f"{r.name}'s trajectory ({lv.min():.3f}–{lv.max():.3f})" for r, _, lv in out)
                + " (not extrapolated)")
            continue
        d = outcome_at(b, k_hi, growth) - outcome_at(a, k_lo, growth)
        if math.isfinite(d):
            diffs[s] = d
        else:
            missing.append(f"seed {s}: no Kurt₀ (step 0) to take the growth from")
    return MatchedCell(diffs, points, missing)
