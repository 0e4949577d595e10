"""The paper's claims (science §5.2) and its ablations, evaluated on a set of runs.

**Pairing.** A claim compares two configurations only if their full resolved configs (model,
data, optim, train) and their data fingerprints are equal except for the seed and the field
under test (fields whose role is ``seed`` or ``resumable``, which change no computation, are
left out: :data:`outlierlab.config.NOT_IDENTITY`, :meth:`RunRecord.identity`).
Where the nearest candidate differs in more, the claim says ``not tested: runs differ in X``
naming the fields. Each pair records the one field that differs (``optim.name: adamw → soap``).

**Outcome.** Each run's Kurt growth Kurt − Kurt₀ from step 0 to the end
(:attr:`RunRecord.kurt_growth`): free of the starting offset (Pre-LN starts near Kurt 1.4, OP
near 1.1, so final Kurt alone can favour OP before any training). Not the log excess ratio
log(Kurt − 1) − log(Kurt₀ − 1), which favours the block that starts further from 1: near
Kurt₀ = 1 it is ill-conditioned (docs/reproduce.md "Verdicts"). Where some run of a claim
lacks a step-0 measurement, final Kurt decides and the summary says so. Final Kurt — each run's
final mean over layers of Kurt = mean_j s_j⁴ / (mean_j s_j²)² (science §1, Eq. 1) on the
held-out validation windows — is always shown beside it.

**Statistics** (:mod:`.significance`). A claim is a main effect: every *cell* (a pair of
configurations equal but for the field under test) where the factor varies counts. Within a
cell, the runs of one seed on both sides are a same-seed pair; the stratified sign-flip
permutation test over all pairs of all cells (:func:`sign_flip_p`, exact) gives the one-sided
p. ``held``: p ≤ :data:`ALPHA` = 0.1 in the claimed direction; ``did not hold``: p ≤ 0.1 the
other way; ``inconclusive`` otherwise; ``indicative only`` when the pairs come from fewer than
:data:`MIN_SEEDS` seeds. Each cell's direction (pairs in direction of pairs) is shown. No pair
is left out because of its outcome. OP vs Pre-Norm and the optimiser pairs compare each
same-seed pair at matched validation loss (:mod:`.matched`: Kurt interpolated along each run's
trajectory at the worse of the two final losses, never extrapolated), the test at the runs' ends
shown beside it; runs without a held-out trajectory are compared at their ends, and an OP cell
more than ``loss_tol`` worse in loss is then counted and flagged with its losses. The W8A8
claim uses the Spearman ρ over runs and its exact permutation p. The QK-norm ablation, whose
diverged runs are −∞, uses the rank-sum test per pair (:class:`SeedTest`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from outlierlab.experiments.matched import has_trajectory, matched_cell
from outlierlab.experiments.results import RunRecord
from outlierlab.experiments.significance import (  # noqa: F401  (the claims' vocabulary)
    ALPHA,
    HELD,
    INCONCLUSIVE,
    INDICATIVE,
    MIN_SEEDS,
    NOT_HELD,
    NOT_TESTED,
    EffectTest,
    SeedTest,
    combine,
    permutation_p,
    rank_sum_p,
    rankdata,
    sign_flip_p,
    spearman,
)
from outlierlab.model.config import PRESETS, GPTConfig
from outlierlab.optim import hyperparameters

SIZE_KEYS = ("model.vocab_size", "model.n_layer", "model.d_model", "model.n_head",
             "model.d_mlp", "model.seq_len")
PRIMARY_SCHEMES = ("w8a8-paper", "w8a8-tensor", "w8a8-dynamic")
"""The W8A8 schemes in the order :func:`claim_quant` takes the first measurable one:
Bondarenko et al.'s sites first (they quantise the residual stream, where Kurt is measured)."""
FALLBACK_SCHEME = "w8a6-tensor"
"""Where W8A8 damages no run (CPU scale), :func:`claim_quant` ranks runs by this scheme."""
SCHEME_SITES = {
    "w8a8-paper": "Bondarenko et al.'s sites, the residual stream included",
    "w8a8-outputs": "linear inputs and outputs, the residual stream and norm outputs",
    "w8a8-tensor": "linear inputs only (for Pre-LN the LN outputs, not the residual stream "
                   "where Kurt is measured)",
    "w8a8-dynamic": "linear inputs only, one range per token",
    "w8a6-tensor": "a 6-bit PROXY of W8A8 on linear inputs only (for Pre-LN the LN outputs, not "
                   "the residual stream where Kurt is measured)",
}
"""What each scheme quantises, as the quantisation claim's text says it."""
OPTIMISER_FIELDS = ("optim.name", *(f"optim.{k}" for k in hyperparameters()
                                       if k not in ("lr", "eps")))
"""The optimiser's name and every hyperparameter some optimiser declares
(:func:`outlierlab.optim.hyperparameters`) except lr and ε."""
ARCH_KEYS = tuple(sorted({f"model.{k}" for p in PRESETS.values() for k in p}))
"""The model fields a preset sets: together they are "the block" the architecture claim tests
(science §2). Every other model field (sizes, activation, init, ...) must be equal in a pair."""


# -- configurations and pairs ----------------------------------------------------------------

@dataclass
class Group:
    """Runs of one configuration (all seeds)."""

    runs: list[RunRecord]

    @property
    def first(self) -> RunRecord:
        return self.runs[0]

    def values(self, metric: str = "final_kurt_mean") -> np.ndarray:
        v = np.array([getattr(r, metric) for r in self.runs], dtype=float)
        return v[np.isfinite(v)]

    def by_seed(self, metric: str = "final_kurt_mean") -> dict[Any, float]:
        """``{seed: value}`` of the runs (``metric`` a :class:`RunRecord` attribute)."""
        return {r.seed: float(getattr(r, metric)) for r in self.runs}

    def mean(self, metric: str = "final_kurt_mean") -> float:
        v = self.values(metric)
        return float(v.mean()) if v.size else math.nan

    def loss(self) -> float:
        """Seed-mean final validation loss (final training loss if no validation)."""
        m = self.mean("final_val_loss")
        return m if math.isfinite(m) else self.mean("final_loss")

    def describe(self, metric: str = "final_kurt_mean") -> str:
        """``3.90 (3.71–4.09, 2 seeds)`` or ``3.90 (1 seed)``."""
        v = self.values(metric)
        if not v.size:
            return "n/a"
        if v.size == 1:
            return f"{v[0]:.2f} (1 seed)"
        return f"{v.mean():.2f} ({v.min():.2f}–{v.max():.2f}, {v.size} seeds)"

    def label(self, fields: Sequence[str] = (), arch: bool = True) -> str:
        """``pre-ln adamw lr=0.01``: block, optimiser and the given config fields."""
        r = self.first
        parts = [r.arch] if arch else []
        parts += [r.optimizer] + [f"{f.rsplit('.', 1)[-1]}={r.flat.get(f)}" for f in fields]
        return " ".join(parts)


@dataclass
class Claim:
    """One claim's verdict and the numbers behind it; ``evidence`` holds one dict per pair
    (``field``: the one field that differs, ``low``/``high``: the configurations, ``p``)."""

    key: str
    statement: str
    verdict: str
    summary: str
    details: list[str] = field(default_factory=list)
    evidence: list[dict[str, Any]] = field(default_factory=list)
    test: dict[str, Any] = field(default_factory=dict)
    """The claim-level test (outcome, pairs, cells, seeds, p, p_other), where there is one."""

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "statement": self.statement, "verdict": self.verdict,
                "summary": self.summary, "details": self.details, "evidence": self.evidence,
                "test": self.test}


def group_runs(runs: Sequence[RunRecord], ignore: tuple[str, ...] = (),
               keep: Callable[[RunRecord], bool] | None = None) -> list[Group]:
    """Runs grouped by config (seeds pooled), in first-seen order; by default the finished
    runs with a final Kurt (``keep`` chooses others)."""
    keep = keep or (lambda r: r.finished and math.isfinite(r.final_kurt_mean))
    groups: dict[Any, Group] = {}
    for r in runs:
        if keep(r):
            groups.setdefault(r.identity(ignore), Group([])).runs.append(r)
    return list(groups.values())


def config_diff(a: RunRecord, b: RunRecord, under_test: Sequence[str] = ()) -> list[str]:
    """The config keys (seeds, maths-free keys and ``under_test`` left out) where ``a`` and
    ``b`` differ."""
    da, db = dict(a.identity(tuple(under_test))), dict(b.identity(tuple(under_test)))
    return sorted(k for k in da.keys() | db.keys() if da.get(k) != db.get(k))


def _arch_values(model: dict[str, Any]) -> dict[str, Any]:
    return {k: model.get(k.split(".", 1)[1]) for k in ARCH_KEYS}


_PRESET_ARCH = {name: _arch_values(GPTConfig.preset(name).to_dict()) for name in PRESETS}


def preset_of(run: RunRecord) -> str | None:
    """The model preset whose block fields (:data:`ARCH_KEYS`) the run has, or None."""
    mine = _arch_values(run.config.get("model", {}))
    return next((n for n, v in _PRESET_ARCH.items() if v == mine), None)


def _near(run: RunRecord, preset: str) -> set[str]:
    """Block fields in which ``run`` differs from ``preset``."""
    mine = _arch_values(run.config.get("model", {}))
    return {k for k, v in _PRESET_ARCH[preset].items() if mine[k] != v}


def _shown(a: RunRecord, b: RunRecord, keys: Sequence[str]) -> str:
    """``optim.name: adamw → soap`` for the first key under test that differs."""
    for k in keys:
        va, vb = a.flat.get(k), b.flat.get(k)
        if va != vb:
            return f"{k}: {va} → {vb}"
    return "nothing"


@dataclass
class Pair:
    """Two configurations a claim compares: ``low`` is the side it says is lower."""

    low: Group
    high: Group
    field: str

    def test(self, metric: str = "final_kurt_mean") -> SeedTest:
        return SeedTest.of(self.low.by_seed(metric), self.high.by_seed(metric))

    def diffs(self, metric: str = "final_kurt_mean") -> dict[Any, float]:
        """``{seed: high − low}`` for the seeds run on both sides (the cell's same-seed pairs)."""
        lo, hi = self.low.by_seed(metric), self.high.by_seed(metric)
        return {s: hi[s] - lo[s] for s in lo if s in hi and math.isfinite(hi[s] - lo[s])}

    def evidence(self, test: SeedTest | EffectTest, **extra: Any) -> dict[str, Any]:
        return {"field": self.field, "low": self.low.label(), "high": self.high.label(),
                "low_runs": [r.name for r in self.low.runs],
                "high_runs": [r.name for r in self.high.runs],
                "kurt_low": self.low.mean(), "kurt_high": self.high.mean(),
                "growth_low": self.low.mean("kurt_growth"),
                "growth_high": self.high.mean("kurt_growth"),
                "loss_low": self.low.loss(), "loss_high": self.high.loss(),
                "seeds": test.seeds if isinstance(test, SeedTest) else test.pairs,
                "in_direction": test.in_direction, "p": test.p,
                "p_other": test.p_other, "verdict": test.verdict, **extra}


def find_pairs(groups: Sequence[Group], is_low: Callable[[Group], bool],
               is_high: Callable[[Group], bool],
               under_test: Callable[[RunRecord, RunRecord], Sequence[str]],
               show: Callable[[Group, Group], str]) -> tuple[list[Pair], list[str]]:
    """Every (low, high) pair equal but for ``under_test``; for a low configuration with none,
    its nearest high one as ``"A vs B: runs differ in X, Y"``."""
    pairs, misses = [], []
    for a in groups:
        if not is_low(a):
            continue
        cands = [(config_diff(a.first, b.first, under_test(a.first, b.first)), b)
                 for b in groups if b is not a and is_high(b)]
        exact = [b for d, b in cands if not d]
        pairs += [Pair(a, b, show(a, b)) for b in exact]
        if cands and not exact:
            d, b = min(cands, key=lambda c: len(c[0]))
            misses.append(f"{b.label()} vs {a.label()}: runs differ in {', '.join(d)}")
    return pairs, misses


def _not_tested(key: str, statement: str, need: str, misses: list[str],
                runs: Sequence[RunRecord], details: Sequence[str] = ()) -> Claim:
    summary = f"runs differ in more than the field under test ({misses[0]})" if misses else need
    return Claim(key, statement, NOT_TESTED, summary,
                 [*details, *(f"not tested: {m}" for m in misses), *_diverged_note(runs)])


def _diverged_note(runs: Sequence[RunRecord]) -> list[str]:
    bad = [r.name for r in runs if r.diverged]
    return [f"left out, diverged: {', '.join(bad)}"] if bad else []


def _seed_note(pairs: Sequence[Pair]) -> str:
    seeds = {r.seed for p in pairs for g in (p.low, p.high) for r in g.runs}
    if len(seeds) >= MIN_SEEDS:
        return ""
    return (f" — {len(seeds)} seed(s): indicative only, a verdict needs {MIN_SEEDS} or more "
            "seeds")


def _span(values: Sequence[float], fmt: str) -> str:
    """``1.20–3.40``, or ``1.20`` when all are equal at that precision."""
    lo, hi = format(min(values), fmt), format(max(values), fmt)
    return lo if lo == hi else f"{lo}–{hi}"


def _verdict_summary(verdicts: Sequence[str]) -> str:
    return (f"{verdicts.count(HELD)} of {len(verdicts)} pair(s) held, "
            f"{verdicts.count(NOT_HELD)} did not, {verdicts.count(INCONCLUSIVE)} inconclusive")


def outcome_metric(pairs: Sequence[Pair]) -> str:
    """``kurt_growth`` when every run of the pairs has it from step 0 (a step-0 Kurt), else
    ``final_kurt_mean`` for all of them (no run is dropped for lacking it)."""
    runs = [r for p in pairs for g in (p.low, p.high) for r in g.runs]
    growth = all(math.isfinite(r.init_kurt_mean) and math.isfinite(r.kurt_growth) for r in runs)
    return "kurt_growth" if growth else "final_kurt_mean"


OUTCOME_NAMES = {"kurt_growth": "Kurt growth Kurt − Kurt₀",
                 "final_kurt_mean": "final Kurt (no step-0 Kurt logged for every run)"}


def _pair_claim(key: str, statement: str, pairs: list[Pair], misses: list[str],
                runs: Sequence[RunRecord], need: str, word: str = "lower",
                note: Callable[[Pair], str] | None = None, matched: bool = False) -> Claim:
    """The common form: every pair is a cell of one stratified sign-flip test of the main
    effect on :func:`outcome_metric` (``note`` may flag a cell, e.g. unmatched loss; it is
    still counted). ``matched``: the test is on the outcome at matched validation loss
    (:mod:`.matched`: Kurt interpolated along each run's trajectory at the worse of the two
    final losses) when every run has a held-out trajectory, and the test at the runs' ends
    is shown beside it; otherwise, and for ``matched=False``, the test is at the ends."""
    if not pairs:
        return _not_tested(key, statement, need, misses, runs)
    metric = outcome_metric(pairs)
    cells = [p.diffs(metric) for p in pairs]
    end_test = EffectTest.of(cells)
    all_runs = [r for p in pairs for g in (p.low, p.high) for r in g.runs]
    use_matched = matched and all(has_trajectory(r) for r in all_runs)
    mcells = ([matched_cell(p.low.runs, p.high.runs, metric == "kurt_growth") for p in pairs]
              if use_matched else [])
    test = EffectTest.of([m.diffs for m in mcells]) if use_matched else end_test
    details, evidence = [], []
    for i, (pair, end_cell) in enumerate(zip(pairs, cells)):
        cell = mcells[i].diffs if use_matched else end_cell
        flag = note(pair) if note else ""
        up = sum(v > 0 for v in cell.values())
        cell_p = sign_flip_p([list(cell.values())])[0] if cell else math.nan
        direction = ("in direction" if cell and up == len(cell) else
                     "against" if cell and up == 0 else "mixed" if cell else "no pair")
        at = ""
        extra: dict[str, Any] = {}
        if use_matched:
            m = mcells[i]
            at = (f"; at matched loss ({_span([q['loss'] for q in m.points.values()], '.3f')})"
                  f" Kurt {m.mean('kurt_high'):.2f} vs {m.mean('kurt_low'):.2f}"
                  + "".join(f"; {x}" for x in m.missing))
            extra = {"kurt_matched_low": m.mean("kurt_low"),
                     "kurt_matched_high": m.mean("kurt_high"), "matched": m.points,
                     "matched_missing": m.missing, "cell_end": end_cell}
        details.append(
            f"{pair.field}: {pair.high.label()} vs {pair.low.label()}: Kurt "
            f"{pair.high.describe()} vs {pair.low.describe()}; growth "
            f"{pair.high.describe('kurt_growth')} vs {pair.low.describe('kurt_growth')}; loss "
            f"{pair.high.loss():.3f} vs {pair.low.loss():.3f}{at}; {word} in {up} of "
            f"{len(cell)} seed pair(s){' at matched loss' if use_matched else ''} ({direction}"
            f", cell p = {cell_p:.3f})" + (f" — {flag}" if flag else ""))
        evidence.append(pair.evidence(test, cell=cell, cell_p=cell_p, direction=direction,
                                      note=flag, counted=True, left_out="", **extra))
        evidence[-1].update(seeds=len(cell), in_direction=up, verdict=direction)
    details += [f"not tested: {m}" for m in misses] + _diverged_note(runs)
    ratios = [e["kurt_high"] / e["kurt_low"] for e in evidence if e["kurt_low"]]
    name = OUTCOME_NAMES[metric]
    if use_matched:
        name += " at matched validation loss"
        if not test.pairs:
            name += " (no same-seed pair has a value there)"
    elif matched:
        name += " at the runs' ends (not every run logged a held-out Kurt trajectory)"
    summary = (f"{name}: {test.describe(word)}; final Kurt ratio "
               f"{_span(ratios, '.2f')}; {sum(e['direction'] == 'in direction' for e in evidence)}"
               f" of {len(pairs)} cell(s) in direction, "
               f"{sum(e['direction'] == 'against' for e in evidence)} against"
               + (f"; at the runs' ends: {end_test.describe(word)}" if use_matched else "")
               + _seed_note(pairs))
    claim = Claim(key, statement, test.verdict, summary, details, evidence)
    claim.test = {"outcome": metric, "matched_loss": use_matched, "pairs": test.pairs,
                  "cells": len(cells), "seeds": test.seeds, "in_direction": test.in_direction,
                  "against": test.against, "p": test.p, "p_other": test.p_other,
                  "end": {"pairs": end_test.pairs, "in_direction": end_test.in_direction,
                          "p": end_test.p, "p_other": end_test.p_other,
                          "verdict": end_test.verdict}}
    return claim


# -- the claims ------------------------------------------------------------------------------

def claim_op_vs_prenorm(runs: Sequence[RunRecord], loss_tol: float = 0.05) -> Claim:
    """OP has lower Kurt than Pre-Norm at matched loss (science §5). The field under test is the
    block (the preset's fields, :data:`ARCH_KEYS`); every pair counts, compared at matched
    validation loss along the runs' trajectories (:mod:`.matched`). Runs without a held-out
    trajectory are compared at their ends, and a cell where OP's seed-mean loss is more than
    ``loss_tol`` (relative) above Pre-Norm's is flagged "not at matched loss" with both losses
    (lower Kurt bought with a worse model)."""
    statement = "The OP block has lower kurtosis than Pre-Norm blocks at matched loss."
    pre = {"pre-ln", "pre-rms", "pre-srms"}
    pairs, misses = find_pairs(
        group_runs(runs), lambda g: preset_of(g.first) == "op",
        lambda g: preset_of(g.first) in pre, lambda a, b: ARCH_KEYS,
        lambda a, b: f"model preset: {preset_of(b.first)} → {preset_of(a.first)}")

    def note(p: Pair) -> str:
        lo, lp = p.low.loss(), p.high.loss()
        if lo > lp + loss_tol * abs(lp):
            return f"not at matched loss: OP's loss {lo / lp - 1:+.1%} against Pre-Norm's"
        return ""

    traj = all(has_trajectory(r) for p in pairs for g in (p.low, p.high) for r in g.runs)
    claim = _pair_claim("op_vs_prenorm", statement, pairs, misses, runs,
                        "needs an OP run and a Pre-Norm run that differ only in the block",
                        note=None if traj else note, matched=True)
    unmatched = sum(bool(e.get("note")) for e in claim.evidence)
    if unmatched:
        claim.summary += f"; {unmatched} cell(s) not at matched loss (flagged, counted)"
    _out_of_scope(claim, find_pairs(
        group_runs(runs), lambda g: preset_of(g.first) == "op",
        lambda g: preset_of(g.first) == "post-ln", lambda a, b: ARCH_KEYS,
        lambda a, b: f"model preset: {preset_of(b.first)} → {preset_of(a.first)}")[0],
        "Post-LN is not a Pre-Norm block")
    return claim


def _out_of_scope(claim: Claim, pairs: Sequence[Pair], why: str) -> None:
    """Show pairs the runs allow but the claim is not about, with their numbers, uncounted
    (so nothing is hidden; no outcome decides what is in scope)."""
    for p in pairs:
        diffs = p.diffs()
        up = sum(v > 0 for v in diffs.values())
        claim.details.append(
            f"outside the claim's scope ({why}), not counted: {p.field}: {p.high.label()} vs "
            f"{p.low.label()}: Kurt {p.high.describe()} vs {p.low.describe()}; loss "
            f"{p.high.loss():.3f} vs {p.low.loss():.3f}; lower in {up} of {len(diffs)} seed "
            "pair(s)")


def _trend_claim(runs: Sequence[RunRecord], key: str, field_name: str, sign: int,
                 statement: str, word: str) -> Claim:
    """Each series of configurations differing only in ``field_name``: its two ends are the
    pair (``sign`` +1: the smallest value is claimed lower; −1: the largest); Spearman ρ over
    the series' seed means is reported beside it."""
    series, pairs = [], []
    for g in group_runs(runs, ignore=(field_name,)):
        by_value: dict[float, list[RunRecord]] = {}
        for r in g.runs:
            v = r.flat.get(field_name)
            if isinstance(v, (int, float)) and math.isfinite(v):
                by_value.setdefault(float(v), []).append(r)
        if len(by_value) >= 2:
            pts = {v: Group(rs) for v, rs in sorted(by_value.items())}
            xs = list(pts)
            low, high = (pts[xs[0]], pts[xs[-1]]) if sign > 0 else (pts[xs[-1]], pts[xs[0]])
            pairs.append(Pair(low, high, _shown(high.first, low.first, (field_name,))))
            series.append(pts)
    misses = []
    if not pairs:
        groups = group_runs(runs)
        cands = [(config_diff(a.first, b.first, (field_name,)), a, b)
                 for a, b in itertools.combinations(groups, 2)
                 if a.first.flat.get(field_name) != b.first.flat.get(field_name)]
        if cands:
            d, a, b = min(cands, key=lambda c: len(c[0]))
            misses.append(f"{a.label((field_name,))} vs {b.label((field_name,))}: runs differ "
                          f"in {', '.join(d)}")
    claim = _pair_claim(key, statement, pairs, misses, runs,
                        f"needs runs that differ only in {field_name} (two values or more)")
    lines = []
    for pts in series:
        xs = list(pts)
        rho = spearman(xs, [pts[x].mean() for x in xs])
        lines.append(f"{pts[xs[0]].label()} series: " + ", ".join(
            f"{word} {x:g}: {pts[x].describe()}" for x in xs) + f"; Spearman ρ = {rho:+.2f}")
    claim.details[:0] = lines
    return claim


def claim_lr(runs: Sequence[RunRecord]) -> Claim:
    """Lower learning rate → lower Kurt (science §3, §5): the lowest lr of a series is lower."""
    return _trend_claim(runs, "lower_lr", "optim.lr", +1,
                        "A lower learning rate gives lower kurtosis.", "lr")


def claim_eps(runs: Sequence[RunRecord]) -> Claim:
    """Larger Adam ε → lower Kurt (science §3, §5): the largest ε of a series is lower."""
    return _trend_claim(runs, "larger_eps", "optim.eps", -1,
                        "A larger Adam ε gives lower kurtosis.", "ε")


def optimiser_keys(a: RunRecord, b: RunRecord) -> list[str]:
    """The field under test when two optimisers are compared: ``optim.name`` and the
    hyperparameters only one of the two has (SOAP's preconditioning frequency, ...). Those
    both have (lr, betas, ε, weight decay, schedule) must be equal."""
    fa, fb = a.flat, b.flat
    keys = {k for k in fa.keys() | fb.keys() if k.startswith("optim.")}
    return ["optim.name", *sorted(k for k in keys
                                  if (fa.get(k) is None) != (fb.get(k) is None))]


def _claim_rotated(runs: Sequence[RunRecord], key: str, rotated: str, diagonal: str,
                   statement: str) -> Claim:
    """A rotated (non-diagonal) optimiser has lower Kurt than its diagonal twin (science §3, §5):
    pairs differ only in the optimiser (the name and the hyperparameters only one of them has,
    :func:`optimiser_keys`)."""
    pairs, misses = find_pairs(
        group_runs(runs), lambda g: g.first.optimizer == rotated,
        lambda g: g.first.optimizer == diagonal, optimiser_keys,
        lambda a, b: _shown(b.first, a.first, ("optim.name",)))
    return _pair_claim(key, statement, pairs, misses, runs,
                       f"needs a {rotated} run and a {diagonal} run that differ only in the "
                       "optimiser", matched=True)


def claim_soap(runs: Sequence[RunRecord]) -> Claim:
    """SOAP (Adam in Shampoo's eigenbasis) has lower Kurt than AdamW."""
    return _claim_rotated(runs, "soap_vs_adamw", "soap", "adamw",
                          "SOAP gives lower kurtosis than AdamW.")


def claim_shampoo(runs: Sequence[RunRecord]) -> Claim:
    """Shampoo as rotated AdaFactor has lower Kurt than AdaFactor (the paper's second pair)."""
    return _claim_rotated(runs, "shampoo_vs_adafactor", "shampoo", "adafactor",
                          "Shampoo (rotated AdaFactor) gives lower kurtosis than AdaFactor.")


def claim_final_norm(runs: Sequence[RunRecord]) -> Claim:
    """Ablation: OP without its final norm has lower Kurt (the paper's 1.2B runs: a final LN
    worsens OFs and signal propagation). Pairs ``op-nofinal`` against ``op``."""
    pairs, misses = find_pairs(
        group_runs(runs), lambda g: preset_of(g.first) == "op-nofinal",
        lambda g: preset_of(g.first) == "op", lambda a, b: ("model.final_norm",),
        lambda a, b: _shown(b.first, a.first, ("model.final_norm",)))
    return _pair_claim("op_final_norm", "Removing OP's final norm lowers kurtosis.", pairs,
                       misses, runs, "needs op and op-nofinal runs that differ only in "
                       "model.final_norm")


def claim_small_beta(runs: Sequence[RunRecord]) -> Claim:
    """Ablation (signal propagation): Pre-LN with a residual gain β < 1 has lower Kurt than
    Pre-LN at β = 1. Token cos-sim (science §1) is shown beside it."""
    def is_small(g: Group) -> bool:
        beta = g.first.config.get("model", {}).get("beta")
        return (_near(g.first, "pre-ln") == {"model.beta"} and isinstance(beta, (int, float))
                and beta < 1)

    pairs, misses = find_pairs(
        group_runs(runs), is_small, lambda g: preset_of(g.first) == "pre-ln",
        lambda a, b: ("model.beta",), lambda a, b: _shown(b.first, a.first, ("model.beta",)))
    claim = _pair_claim("small_beta", "A small residual gain β in Pre-LN (better signal "
                        "propagation) lowers kurtosis.", pairs, misses, runs,
                        "needs Pre-LN runs at β = 1 and β < 1 that differ only in model.beta")
    claim.details += [f"{p.field}: token cos-sim {p.high.describe('final_cos_sim')} vs "
                      f"{p.low.describe('final_cos_sim')}" for p in pairs]
    return claim


def claim_qk_norm(runs: Sequence[RunRecord]) -> Claim:
    """Ablation: OP without QK-norm (no entropy regulation, science §2) collapses attention
    entropy or diverges. Per seed the value is the final smallest attention entropy over
    layers (``attn_entropy_min``) and −∞ for a diverged run; OP with QK-norm is the ``high``
    side. Without entropy logged, only divergence can decide."""
    statement = "OP without QK-norm collapses attention entropy or diverges."
    ended = lambda r: r.finished or r.diverged  # noqa: E731
    pairs, misses = find_pairs(
        group_runs(runs, keep=ended),
        lambda g: _near(g.first, "op") == {"model.qk_norm"}
        and g.first.config["model"].get("logit_softcap") is None,
        lambda g: preset_of(g.first) == "op" and all(r.finished for r in g.runs),
        lambda a, b: ("model.qk_norm",), lambda a, b: _shown(b.first, a.first, ("model.qk_norm",)))
    if not pairs:
        return _not_tested("qk_norm", statement, "needs OP runs with and without QK-norm that "
                           "differ only in model.qk_norm", misses, [])
    details, evidence, verdicts, diverged = [], [], [], []
    for p in pairs:
        low = {r.seed: -math.inf if r.diverged else r.final_attn_entropy_min for r in p.low.runs}
        diverged.append(f"{sum(r.diverged for r in p.low.runs)} of {len(p.low.runs)}")
        high = p.high.by_seed("final_attn_entropy_min")
        n_div = sum(r.diverged for r in p.low.runs)
        logged = not any(math.isnan(v) for v in [*low.values(), *high.values()])
        head = (f"{p.field}: {n_div} of {len(p.low.runs)} seed(s) diverged without QK-norm "
                f"({', '.join(r.name for r in p.low.runs if r.diverged) or 'none'})")
        if not logged and n_div < len(p.low.runs):
            details.append(f"{head}; attention entropy not logged (attn_entropy_min): "
                           "not tested")
            continue
        if not logged:  # every run without QK-norm diverged: compare divergence alone
            low, high = dict.fromkeys(low, -math.inf), dict.fromkeys(high, 0.0)
        t = SeedTest.of(low, high)
        details.append(f"{head}; min attention entropy with QK-norm {_entropies(high, logged)}"
                       f", without: {_entropies(low, logged)}; {t.describe('lower')} → "
                       f"{t.verdict}")
        evidence.append(p.evidence(t, diverged=n_div, counted=True, left_out=""))
        verdicts.append(t.verdict)
    if not verdicts:
        return Claim("qk_norm", statement, NOT_TESTED, f"{', '.join(diverged)} run(s) without "
                     "QK-norm diverged; attention entropy not logged (attn_entropy_min) to judge "
                     "the others", details)
    summary = _verdict_summary(verdicts) + _seed_note(pairs)
    return Claim("qk_norm", statement, combine(verdicts), summary, details, evidence)


def _entropies(values: dict[Any, float], logged: bool) -> str:
    if not logged:
        return "n/a"
    return ", ".join("diverged" if v == -math.inf else f"{v:.3f}" for v in values.values())


def _cell_means(runs: Sequence[RunRecord], scheme: str) -> list[dict[str, Any]]:
    """One point per configuration (seeds pooled, :func:`group_runs`) quantised with ``scheme``:
    the mean over its seeds of the final mean Kurt and of the relative increase quant/FP − 1."""
    def keep(r: RunRecord) -> bool:
        return (r.finished and math.isfinite(r.final_kurt_mean) and scheme in r.quant
                and math.isfinite(r.quant[scheme].rel_increase))

    cells = []
    for g in group_runs(runs, keep=keep):
        cells.append({"runs": [r.name for r in g.runs],
                      "kurt": float(np.mean([r.final_kurt_mean for r in g.runs])),
                      "rel_increase": float(np.mean([r.quant[scheme].rel_increase
                                                     for r in g.runs]))})
    return cells


def claim_quant(runs: Sequence[RunRecord], min_runs: int = 3,
                min_effect: float = 1e-3) -> Claim:
    """Higher Kurt ↔ larger W8A8 perplexity increase (science §4, §5): Spearman ρ between the
    configurations' mean final Kurt and mean relative increase quant/FP − 1 (one point per
    configuration, the mean over its seeds: seeds of one configuration are replicates, not
    independent configurations), with its exact one-sided permutation p over configurations:
    held when ρ > 0 with p ≤ ALPHA, did not hold when ρ < 0 with the other side's p ≤ ALPHA,
    else inconclusive. ``min_runs`` is the fewest configurations. The verdict uses the first
    of :data:`PRIMARY_SCHEMES` (``w8a8-paper``, then ``w8a8-tensor``, ``w8a8-dynamic``), then any
    other W8A8 scheme, under which some configuration's perplexity moved by at least
    ``min_effect`` (relative). Where no W8A8 scheme moved any (CPU scale), it ranks by the damage
    at 6-bit activations (``w8a6-tensor``, :data:`FALLBACK_SCHEME`) and labels it a proxy; with
    no damage there either the claim is not tested. Every scheme is reported, each with what it
    quantises (:data:`SCHEME_SITES`)."""
    statement = "Higher kurtosis goes with a larger W8A8 perplexity increase."
    schemes = sorted({s for r in runs for s in r.quant},
                     key=lambda s: (PRIMARY_SCHEMES.index(s) if s in PRIMARY_SCHEMES
                                    else len(PRIMARY_SCHEMES), s))
    details, evidence = [], []
    for s in schemes:
        cells = _cell_means(runs, s)
        n_runs = sum(len(c["runs"]) for c in cells)
        sites = f" [{SCHEME_SITES[s]}]" if s in SCHEME_SITES else ""
        if len(cells) < min_runs:
            details.append(f"{s}: only {len(cells)} configuration(s), needs {min_runs}")
            continue
        k = [c["kurt"] for c in cells]
        inc = [c["rel_increase"] for c in cells]
        rho = spearman(k, inc)
        p, p_other = permutation_p(k, inc), permutation_p(k, inc, greater=False)
        measurable = max(abs(x) for x in inc) >= min_effect
        details.append(f"{s}{sites}: ρ(Kurt, ppl increase) = {rho:+.2f} over {len(cells)} "
                       f"configurations (seed means of {n_runs} runs; one-sided permutation "
                       f"p = {p:.3f}); increase {min(inc):+.2%} to {max(inc):+.2%}"
                       + ("" if measurable else
                          f" — below {min_effect:.1%} in every configuration: no damage to rank"))
        evidence.append({"scheme": s, "rho": rho, "p": p, "p_other": p_other, "n": len(cells),
                         "n_runs": n_runs, "measurable": measurable, "proxy": s == FALLBACK_SCHEME,
                         "cells": [c["runs"] for c in cells], "kurt": k, "rel_increase": inc})
    decisive = [e for e in evidence if e["measurable"] and e["scheme"].startswith("w8a8")]
    proxy = ""
    if not decisive:  # int8 moved nothing: rank by the damage at 6-bit activations
        decisive = [e for e in evidence if e["measurable"] and e["scheme"] == FALLBACK_SCHEME]
        proxy = (f" — PROXY: W8A8 moved no configuration by {min_effect:.1%}, so configurations "
                 f"are ranked at 6-bit activations ({FALLBACK_SCHEME}), "
                 f"{SCHEME_SITES[FALLBACK_SCHEME]}")
    if not decisive:
        why = (f"needs {min_runs} or more configurations with W8A8 results" if not evidence else
               f"W8A8 moved no configuration's perplexity by {min_effect:.1%} or more: "
               "nothing to rank")
        return Claim("kurt_vs_quant", statement, NOT_TESTED, why,
                     details + _diverged_note(runs), evidence)
    main = decisive[0]
    rho = main["rho"]
    if math.isfinite(rho) and rho > 0 and main["p"] <= ALPHA:
        verdict = HELD
    elif math.isfinite(rho) and rho < 0 and main["p_other"] <= ALPHA:
        verdict = NOT_HELD
    else:
        verdict = INCONCLUSIVE
    what = "" if proxy or main["scheme"] not in SCHEME_SITES else \
        f" ({SCHEME_SITES[main['scheme']]})"
    summary = (f"{main['scheme']}{what}: Spearman ρ = {rho:+.2f} over {main['n']} "
               f"configurations (seed means of {main['n_runs']} runs; one-sided p = "
               f"{main['p']:.3f}; held needs ρ > 0 and p ≤ {ALPHA}){proxy}")
    return Claim("kurt_vs_quant", statement, verdict, summary,
                 details + _diverged_note(runs), evidence)


def evaluate_claims(runs: Sequence[RunRecord], loss_tol: float = 0.05) -> list[Claim]:
    """The five claims of science §5 in the paper's order, then the second optimiser pair
    (AdaFactor ↔ Shampoo) and the three ablations (final norm, QK-norm, small β); those without
    their runs are left out."""
    claims = [claim_op_vs_prenorm(runs, loss_tol), claim_lr(runs), claim_eps(runs),
              claim_soap(runs), claim_quant(runs)]
    ablations = [claim_shampoo(runs), claim_final_norm(runs), claim_qk_norm(runs),
                 claim_small_beta(runs)]
    return claims + [c for c in ablations if c.verdict != NOT_TESTED or c.evidence
                     or any(not d.startswith("left out, diverged") for d in c.details)]
