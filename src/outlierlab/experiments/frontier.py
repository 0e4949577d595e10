"""The Kurt–validation-loss frontier (issue 23): a method is better when, at every validation
loss it reaches, it can get there with lower kurtosis, whatever the lr.

Per *configuration* (everything but the lr and the seed) and per lr, the seed-mean trajectory
is the (validation loss, held-out mean Kurt) at each evaluation step every seed logged (science
§1 Eq. 1; :meth:`RunRecord.trajectory`); its last point is the lr's final point. The
configuration's **frontier** at loss L is the lowest Kurt any of its lrs' trajectories has at L
(Kurt interpolated linearly in loss, :func:`~.matched.kurt_at_loss`; nan where no trajectory
reaches L). Configurations are compared in *panels* of configurations equal but for one factor
(the block, or the optimiser); the numeric summary gives each one's frontier at the *matched
loss* L* = the worst of their best losses (the lowest loss every configuration of the panel
reaches) and at L* + 0.05 and + 0.1 nats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from outlierlab.experiments.claims import ARCH_KEYS, OPTIMISER_FIELDS
from outlierlab.experiments.matched import has_trajectory, kurt_at_loss
from outlierlab.experiments.results import RunRecord
from outlierlab.jsonable import json_safe

LR = "optim.lr"
OFFSETS = (0.0, 0.05, 0.1)
"""Loss levels of the summary above the panel's matched loss L* (nats)."""
FACTORS: dict[str, tuple[tuple[str, ...], Callable[[RunRecord], str]]] = {
    "block": (ARCH_KEYS, lambda r: r.arch),
    "optimiser": (tuple(OPTIMISER_FIELDS), lambda r: r.optimizer),
}
"""Panel factor → (the config fields it covers, the configuration's name in a panel)."""


@dataclass
class Curve:
    """One lr's seed-mean trajectory."""

    lr: float
    seeds: int
    loss: np.ndarray
    kurt: np.ndarray

    @property
    def final(self) -> tuple[float, float]:
        return float(self.loss[-1]), float(self.kurt[-1])


@dataclass
class ConfigFrontier:
    """A configuration's curves (one per lr) and its frontier."""

    name: str
    curves: list[Curve]
    runs: list[RunRecord] = field(default_factory=list)

    @property
    def best_loss(self) -> float:
        return min(float(c.loss.min()) for c in self.curves)

    def best_at(self, loss: float) -> tuple[float, float]:
        """(lowest Kurt over the lrs' trajectories at validation loss ``loss``, the lr giving
        it); (nan, nan) when none reaches it."""
        vals = [(kurt_at_loss(c.loss, c.kurt, loss), c.lr) for c in self.curves]
        vals = [v for v in vals if math.isfinite(v[0])]
        return min(vals) if vals else (math.nan, math.nan)

    def at(self, loss: float) -> float:
        """Lowest Kurt over the lrs' trajectories at validation loss ``loss`` (nan: none)."""
        return self.best_at(loss)[0]


@dataclass
class Panel:
    """Configurations equal but for ``factor``, and the summary of their frontiers."""

    factor: str
    title: str
    configs: list[ConfigFrontier]

    @property
    def matched_loss(self) -> float:
        """L*: the worst of the configurations' best losses (the lowest loss all reach)."""
        return max(c.best_loss for c in self.configs)

    def summary(self) -> list[dict[str, Any]]:
        """Per loss level L* + offset: each configuration's frontier Kurt and its lr."""
        out = []
        for off in OFFSETS:
            level = self.matched_loss + off
            best = {c.name: c.best_at(level) for c in self.configs}
            out.append({"loss": level, "kurt": {n: b[0] for n, b in best.items()},
                        "lr": {n: b[1] for n, b in best.items()}})
        return out


def _seed_mean_curve(runs: Sequence[RunRecord], lr: float) -> Curve | None:
    """The seed-mean trajectory over the evaluation steps every run logged (None: none)."""
    steps = None
    per_run = []
    for r in runs:
        ok = np.isfinite(r.val_loss) & np.isfinite(r.val_kurt)
        s = dict(zip(r.val_steps[ok].tolist(), zip(r.val_loss[ok], r.val_kurt[ok])))
        per_run.append(s)
        steps = set(s) if steps is None else steps & set(s)
    if not steps or len(steps) < 2:
        return None
    order = sorted(steps)
    loss = np.array([[s[t][0] for t in order] for s in per_run]).mean(axis=0)
    kurt = np.array([[s[t][1] for t in order] for s in per_run]).mean(axis=0)
    return Curve(lr, len(runs), loss, kurt)


def _identity(r: RunRecord, ignore: tuple[str, ...] = ()) -> Any:
    return r.identity((LR, *ignore))


def panels(runs: Sequence[RunRecord], factor: str) -> list[Panel]:
    """The panels of ``factor`` (``block`` or ``optimiser``) with two configurations or more,
    from the finished runs with a held-out trajectory."""
    fields, name_of = FACTORS[factor]
    runs = [r for r in runs if r.finished and has_trajectory(r)]
    by_panel: dict[Any, dict[Any, list[RunRecord]]] = {}
    for r in runs:
        by_panel.setdefault(_identity(r, fields), {}).setdefault(_identity(r), []).append(r)
    out = []
    for confs in by_panel.values():
        if len(confs) < 2:
            continue
        frontiers = []
        for rs in confs.values():
            curves = [c for lr in sorted({r.lr for r in rs})
                      if (c := _seed_mean_curve([r for r in rs if r.lr == lr], lr))]
            if curves:
                frontiers.append(ConfigFrontier(name_of(rs[0]), curves, rs))
        if len(frontiers) >= 2:
            first = frontiers[0].runs[0]
            other = first.optimizer if factor == "block" else first.arch
            out.append(Panel(factor, f"{other}: {' vs '.join(f.name for f in frontiers)}",
                             frontiers))
    return out


def summary_rows(all_panels: Sequence[Panel]) -> tuple[list[str], list[list[str]]]:
    """The report's frontier table: per panel and loss level, each configuration's frontier
    Kurt (its lr in brackets)."""
    header = ["panel", "validation loss", "frontier Kurt (lr)"]
    rows = []
    for p in all_panels:
        for i, level in enumerate(p.summary()):
            tag = "L*" if i == 0 else f"L* + {OFFSETS[i]:g}"
            cells = "; ".join(
                f"{n} {k:.2f} ({level['lr'][n]:g})" if math.isfinite(k) else f"{n} –"
                for n, k in level["kurt"].items())
            rows.append([p.title, f"{tag} = {level['loss']:.3f}", cells])
    return header, rows


def to_json(all_panels: Sequence[Panel]) -> list[dict[str, Any]]:
    """The panels as plain data (``frontier.json``): curves and the summary."""
    return json_safe(json.loads(json.dumps([
        {"factor": p.factor, "title": p.title, "matched_loss": p.matched_loss,
         "summary": p.summary(),
         "configurations": [{"name": c.name, "best_loss": c.best_loss, "curves": [
             {"lr": k.lr, "seeds": k.seeds, "loss": k.loss.tolist(), "kurt": k.kurt.tolist()}
             for k in c.curves]} for c in p.configs]} for p in all_panels],
        default=float)))
