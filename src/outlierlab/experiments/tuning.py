"""The learning rates chosen by a tuning sweep (issue 23; docs/reproduce.md "How settings are
chosen"), by the rule fixed before the sweep ran:

- a *configuration* is everything but the lr and the seed (block, optimiser, sizes, ...);
- its **own lr** is the lr of lowest seed-mean final validation loss (a diverged run counts as
  an infinite loss, so an lr where some seed diverged is never chosen);
- the **shared lr** is the largest lr, among those every configuration ran, at which every
  configuration's seed-mean loss is within :data:`TOLERANCE` (2 %) of its own best; there may
  be none, and the result says so;
- the **nearest shared lr** (added 2026-12-03, when healthy-lr's tuning seeds had none within
  2 %; still tuning seeds only) is the common lr whose worst configuration gap is smallest
  (ties: the larger lr). It may differ from the shared lr (a smaller lr can have the smaller
  worst gap); the claims "at a shared lr" use it only when there is no shared lr, and say so
  with its worst gap.

Only tuning seeds (≥ :data:`~outlierlab.experiments.grid.TUNING_MIN`) may choose:
:func:`choose_lrs` refuses runs of the test seeds (:class:`TuningError`), so the seeds that give
the verdicts never feed a choice. Per lr the seed-mean final Kurt and Kurt growth (science §1,
Eq. 1, on the held-out windows) are kept beside the loss so the docs can cite them.
:func:`write_tuning` writes ``tuning.md`` and ``tuning.json``; :meth:`Tuning.load` reads the
JSON back, and :meth:`Tuning.own_lr` tells a test run's configuration its own lr.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from outlierlab import safe_io
from outlierlab.errors import DataError
from outlierlab.experiments.grid import TUNING_MIN, shipped_tunings, tuning_text
from outlierlab.experiments.results import RunRecord
from outlierlab.experiments.tables import md_table
from outlierlab.jsonable import to_number_or_str

TOLERANCE = 0.02
"""Relative loss gap above a configuration's own best still counted "within" at the shared lr."""
LR = "optim.lr"


class TuningError(DataError):
    """The runs cannot choose an lr: test seeds among them, or no lr series."""


@dataclass
class LrPoint:
    """One configuration at one lr: seed means of its ended runs (diverged: loss ∞)."""

    lr: float
    runs: list[str]
    seeds: list[Any]
    loss: float
    """Seed-mean final validation loss (∞ when a seed diverged)."""
    kurt: float
    """Seed-mean final mean Kurt over layers (held-out), diverged runs left out."""
    growth: float
    """Seed-mean Kurt growth Kurt − Kurt₀, diverged runs left out."""
    diverged: int = 0


@dataclass
class Configuration:
    """A configuration's lr series and its own lr."""

    label: str
    key: dict[str, Any]
    """The run identity without lr and seed (:meth:`RunRecord.identity`), values decoded."""
    points: list[LrPoint]
    own_lr: float | None
    best_loss: float

    def at(self, lr: float) -> LrPoint | None:
        return next((p for p in self.points if math.isclose(p.lr, lr, rel_tol=1e-9)), None)


@dataclass
class Tuning:
    """The chosen lrs and the numbers behind them (``tuning.json``)."""

    tolerance: float
    configurations: list[Configuration]
    shared_lr: float | None
    shared_why: str
    seeds: list[Any]
    notes: list[str] = field(default_factory=list)
    """What makes the choice provisional (unfinished runs, missing seeds), empty when none."""
    nearest_lr: float | None = None
    """The common lr of smallest worst-case gap to each configuration's best (module docstring)."""
    nearest_gap: float = math.nan
    """That worst-case relative loss gap at :attr:`nearest_lr`."""
    nearest_worst: str = ""
    """The configuration with that gap."""

    def own_lr(self, run: RunRecord) -> float | None:
        """The own lr of ``run``'s configuration (everything but lr and seed equal), or None
        when no tuned configuration matches it."""
        key = _key(run)
        return next((c.own_lr for c in self.configurations if c.key == key), None)

    def differences(self, run: RunRecord) -> list[str]:
        """The fields in which ``run`` differs from the nearest tuned configuration (lr and seed
        left out); [] when one matches."""
        key = _key(run)
        diffs = [sorted(k for k in key.keys() | c.key.keys() if key.get(k) != c.key.get(k))
                 for c in self.configurations]
        return min(diffs, key=len) if diffs else []

    def to_dict(self) -> dict[str, Any]:
        return {"rule": RULE.format(tol=self.tolerance), **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Tuning:
        confs = [Configuration(c["label"], c["key"], [LrPoint(**p) for p in c["points"]],
                               c["own_lr"], c["best_loss"]) for c in d["configurations"]]
        return cls(d["tolerance"], confs, d["shared_lr"], d["shared_why"], d["seeds"],
                   d.get("notes", []), d.get("nearest_lr"),
                   math.nan if d.get("nearest_gap") is None else float(d["nearest_gap"]),
                   d.get("nearest_worst", ""))

    @classmethod
    def load(cls, path: str | Path) -> Tuning:
        """Read a ``tuning.json``, or a shipped lr choice by name (``healthy-lr``:
        ``presets/tuning/<name>.json``) (→ :class:`TuningError` when it is neither)."""
        shipped = shipped_tunings()
        try:
            if not Path(path).exists() and str(path) in shipped:
                text = tuning_text(str(path))
            else:
                text = Path(path).read_text()
            return cls.from_dict(json.loads(text))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise TuningError(f"{path}: not a tuning.json written by outlierlab report "
                              f"({exc}); allowed: REPORT/tuning.json of a tuning sweep, or "
                              f"{', '.join(shipped) or 'a shipped lr choice'}") from exc


RULE = ("own lr: lowest seed-mean final validation loss; shared lr: the largest lr at which "
        "every configuration is within {tol:.0%} of its own best loss")


def _key(run: RunRecord) -> dict[str, Any]:
    return {k: json.loads(v) for k, v in run.identity((LR,))}


def _loss(r: RunRecord) -> float:
    if r.diverged:
        return math.inf
    v = r.final_val_loss
    return v if math.isfinite(v) else r.final_loss


def _mean(values: Sequence[float]) -> float:
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def _labels(keys: Sequence[dict[str, Any]], runs: Sequence[RunRecord]) -> list[str]:
    """``pre-ln adamw`` plus every other field with two values or more among the configurations
    that have it (an optimiser's own hyperparameter, absent in the others, is not named)."""
    def values(k: str) -> set[str]:
        return {json.dumps(d[k], sort_keys=True) for d in keys if d.get(k) is not None}

    varying = sorted(k for k in set().union(*keys) if len(values(k)) > 1
                     and not k.startswith("model.") and k not in ("optim.name",
                                                                   "data_fingerprint"))
    return [" ".join([r.arch, r.optimizer, *(f"{k.rsplit('.', 1)[-1]}={d.get(k)}"
                                             for k in varying)]) for d, r in zip(keys, runs)]


def check_tuning_seeds(runs: Sequence[RunRecord]) -> None:
    """:class:`TuningError` unless every run's seed is a tuning seed (≥ TUNING_MIN)."""
    bad = [r for r in runs if not isinstance(r.seed, int) or r.seed < TUNING_MIN]
    if bad:
        seeds = sorted({str(r.seed) for r in bad})
        names = ", ".join(r.name for r in bad[:3]) + (", ..." if len(bad) > 3 else "")
        raise TuningError(f"cannot choose an lr from seed(s) {', '.join(seeds)} ({names}); "
                          f"allowed: tuning seeds ≥ {TUNING_MIN} only (the test seeds never "
                          "choose a setting, docs/reproduce.md 'How settings are chosen')")


def choose_lrs(runs: Sequence[RunRecord], tolerance: float = TOLERANCE) -> Tuning:
    """Each configuration's own lr and the shared lr (module docstring) from a tuning sweep's
    runs (configurations in label order); runs still going (neither finished nor diverged)
    are left out and named in ``notes``. :class:`TuningError` for a test seed or when no
    configuration ran two lrs."""
    runs = list(runs)
    check_tuning_seeds(runs)
    ended = [r for r in runs if r.finished or r.diverged]
    notes = []
    if len(ended) < len(runs):
        notes.append(f"{len(runs) - len(ended)} of {len(runs)} run(s) not ended (left out): "
                     "the choice is provisional")
    by_conf: dict[Any, list[RunRecord]] = {}
    for r in ended:
        by_conf.setdefault(r.identity((LR,)), []).append(r)
    if not by_conf or max(len({r.lr for r in rs}) for rs in by_conf.values()) < 2:
        raise TuningError("no configuration ran two lrs or more; allowed: a tuning sweep whose "
                          "configurations differ only in optim.lr and the seed")
    keys = [_key(rs[0]) for rs in by_conf.values()]
    labels = _labels(keys, [rs[0] for rs in by_conf.values()])
    confs, all_seeds = [], sorted({r.seed for r in ended})
    for label, key, rs in zip(labels, keys, by_conf.values()):
        points = []
        for lr in sorted({r.lr for r in rs}):
            at = sorted((r for r in rs if r.lr == lr), key=lambda r: r.seed)
            ok = [r for r in at if not r.diverged]
            points.append(LrPoint(lr, [r.name for r in at], [r.seed for r in at],
                                  float(np.mean([_loss(r) for r in at])),
                                  _mean([r.final_kurt_mean for r in ok]),
                                  _mean([r.kurt_growth for r in ok]),
                                  sum(r.diverged for r in at)))
            if [r.seed for r in at] != all_seeds:
                notes.append(f"{label} lr {lr:g}: seeds {', '.join(map(str, points[-1].seeds))}"
                             f" of {', '.join(map(str, all_seeds))}")
        finite = [p for p in points if math.isfinite(p.loss)]
        best = min(finite, key=lambda p: p.loss) if finite else None
        confs.append(Configuration(label, key, points, best.lr if best else None,
                                   best.loss if best else math.inf))
        if best and len(points) >= 2 and best.lr in (points[0].lr, points[-1].lr):
            edge = "largest" if best.lr == points[-1].lr else "smallest"
            notes.append(f"{label}: own lr {best.lr:g} is the {edge} lr tried; its best may "
                         "lie beyond the grid")
    confs.sort(key=lambda c: c.label)
    worst = _worst_gaps(confs)
    shared, why = _shared(confs, tolerance, worst)
    return Tuning(tolerance, confs, shared, why, all_seeds, notes, *_nearest(confs, worst))


def _worst_gaps(confs: Sequence[Configuration]) -> dict[float, tuple[float, str]]:
    """Per lr every configuration ran (largest first): the largest relative gap of a
    configuration's seed-mean loss to its own best there, and that configuration's label."""
    common = sorted(set.intersection(*({p.lr for p in c.points} for c in confs)),
                    reverse=True) if confs else []
    return {lr: max((c.at(lr).loss / c.best_loss - 1, c.label) for c in confs) for lr in common}


def _shared(confs: Sequence[Configuration], tol: float,
            worst: dict[float, tuple[float, str]]) -> tuple[float | None, str]:
    """The shared lr (module docstring) and why; ``worst``: :func:`_worst_gaps`."""
    for lr in worst:
        if all(math.isfinite(c.best_loss) and c.at(lr).loss <= c.best_loss * (1 + tol)
               for c in confs):
            return lr, (f"the largest of {len(worst)} common lr(s) at which every "
                        f"configuration is within {tol:.0%} of its own best loss")
    gaps = "; ".join(f"lr {lr:g}: {g:+.1%} ({lab})" for lr, (g, lab) in worst.items())
    return None, (f"none: at no common lr is every configuration within {tol:.0%} of its own "
                  f"best loss (worst gap per lr: {gaps})" if worst else
                  "none: the configurations share no lr")


def _nearest(confs: Sequence[Configuration],
             worst: dict[float, tuple[float, str]]) -> tuple[float | None, float, str]:
    """The common lr whose largest gap to a configuration's best loss is smallest (ties: the
    larger lr), that gap and the configuration with it; (None, nan, "") without a common lr or
    a finite best. ``worst``: :func:`_worst_gaps`."""
    if not worst or not all(math.isfinite(c.best_loss) for c in confs):
        return None, math.nan, ""
    lr = min(worst, key=lambda x: (worst[x][0], -x))
    return lr, float(worst[lr][0]), worst[lr][1]


def markdown(t: Tuning) -> str:
    """``tuning.md``: the rule, the chosen lrs and per-lr seed-mean loss and Kurt tables."""
    lrs = sorted({p.lr for c in t.configurations for p in c.points})
    head = ["configuration", *(f"lr {lr:g}" for lr in lrs), "own lr"]
    loss_rows, kurt_rows = [], []
    for c in t.configurations:
        lcells, kcells = [], []
        for lr in lrs:
            p = c.at(lr)
            mark = "**" if p and c.own_lr == lr else ""
            if p is None:
                lcells.append("–")
                kcells.append("–")
                continue
            gap = f" ({p.loss / c.best_loss - 1:+.1%})" if math.isfinite(p.loss) else ""
            div = f", {p.diverged} diverged" if p.diverged else ""
            lcells.append(f"{mark}{p.loss:.3f}{mark}{gap}{div}")
            kcells.append(f"{mark}{p.kurt:.2f}{mark} (growth {p.growth:+.2f})")
        own = "–" if c.own_lr is None else f"{c.own_lr:g}"
        loss_rows.append([c.label, *lcells, own])
        kurt_rows.append([c.label, *kcells, own])

    shared = "none" if t.shared_lr is None else f"{t.shared_lr:g}"
    lines = ["# lr tuning", "", f"Rule (fixed before the sweep ran): {RULE.format(tol=t.tolerance)}"
             f". Seeds {', '.join(map(str, t.seeds))} (tuning seeds ≥ {TUNING_MIN} only).", "",
             f"**Shared lr: {shared}** — {t.shared_why}.", "",
             *([f"**Nearest shared lr: {t.nearest_lr:g}** — the common lr of smallest worst "
                f"gap to a configuration's best loss ({t.nearest_gap:+.1%}, {t.nearest_worst}); "
                "the claims at a shared lr use it.", ""]
               if t.shared_lr is None and t.nearest_lr is not None else []),
             "**Own lr per configuration:** " + "; ".join(
                 f"{c.label}: {'–' if c.own_lr is None else format(c.own_lr, 'g')}"
                 for c in t.configurations) + ".", ""]
    lines += [f"- {n}" for n in t.notes] + ([""] if t.notes else [])
    lines += ["## Seed-mean final validation loss (gap to the configuration's best)", "",
              md_table(head, loss_rows), "",
              "## Seed-mean final mean Kurt on the held-out windows (Kurt growth from step 0)",
              "", md_table(head, kurt_rows), ""]
    return "\n".join(lines)


def write_tuning(t: Tuning, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``tuning.md`` and ``tuning.json`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = safe_io.write_text(out / "tuning.md", markdown(t))
    js = safe_io.write_text(out / "tuning.json",
                            json.dumps(t.to_dict(), indent=1, default=to_number_or_str))
    return md, js


def is_tuning_sweep(runs: Sequence[RunRecord]) -> bool:
    """Every run is on a tuning seed and some configuration ran two lrs or more."""
    if not runs or any(not isinstance(r.seed, int) or r.seed < TUNING_MIN for r in runs):
        return False
    lrs: dict[Any, set[float]] = {}
    for r in runs:
        lrs.setdefault(r.identity((LR,)), set()).add(r.lr)
    return max(len(v) for v in lrs.values()) >= 2


def mixed_seeds_note(runs: Sequence[RunRecord]) -> str:
    """Why a report of tuning and test seeds together chooses no lr ("" when the runs are not
    mixed): the test seeds never feed a choice."""
    seeds = {r.seed for r in runs}
    tuning = {s for s in seeds if isinstance(s, int) and s >= TUNING_MIN}
    if not tuning or tuning == seeds:
        return ""
    other = sorted(seeds - tuning, key=str)
    return (f"no lr chosen: the runs mix tuning seeds ({', '.join(map(str, sorted(tuning)))}) "
            f"with seed(s) {', '.join(map(str, other))}; settings are chosen on tuning seeds ≥ "
            f"{TUNING_MIN} only (report the tuning runs alone to choose)")
