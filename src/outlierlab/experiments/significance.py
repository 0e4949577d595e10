"""Seed statistics for the claims (docs/reproduce.md "Verdicts"): ranks, Spearman's ρ, exact
one-sided permutation tests, and one pair's verdict over seeds.

- :func:`rank_sum_p`: the exact permutation test of "``low`` is below ``high``" on ranks (the
  Mann–Whitney form): every split of the pooled runs into groups of the two sizes is counted.
  With 3 values a side the smallest p is 1/20; with 2, 1/6; with 1, 1/2.
- :func:`sign_flip_p`: the stratified same-seed sign-flip permutation test of a main effect
  (issue 23): in every cell (a configuration of the other fields where the factor varies) the
  runs of one seed on both sides form a pair, d = high − low; the statistic is the sum over
  cells of each cell's mean d, and the null flips the sign of every pair independently (the two
  sides of a same-seed pair are exchangeable), exactly over all 2ᴺ flips up to
  :data:`EXACT_PAIRS` pairs, else on a seeded Monte Carlo sample. N pairs all in one direction
  give p = 2⁻ᴺ: 3 pairs 1/8, 4 pairs 1/16, 6 pairs 1/64.
- :class:`EffectTest`: a claim's verdict from that test: ``held`` when p ≤ ALPHA in the claimed
  direction, ``did not hold`` only when p ≤ ALPHA the other way, ``inconclusive`` otherwise;
  ``indicative only`` when the pairs come from fewer than :data:`MIN_SEEDS` seeds.
- :class:`SeedTest`: one pair's rank-sum test over seeds (the QK-norm ablation, whose diverged
  runs are −∞ and cannot be differenced): ``held`` when every same-seed pair is in the direction
  *and* p ≤ ALPHA; ``did not hold`` only when significant the other way. :func:`combine` gives a
  claim's verdict from its pairs'.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HELD, NOT_HELD, INCONCLUSIVE, NOT_TESTED = "held", "did not hold", "inconclusive", "not tested"
INDICATIVE = "indicative only"
"""Fewer than :data:`MIN_SEEDS` seeds: the direction is shown, no verdict is given."""
ALPHA = 0.1
"""Largest one-sided permutation p-value a verdict (``held`` or ``did not hold``) accepts."""
MIN_SEEDS = 3
"""Seeds below which a comparison is indicative only."""
EXACT_PAIRS = 16
"""Up to this many same-seed pairs the sign-flip test enumerates all 2ᴺ flips."""


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (as ``scipy.stats.rankdata``)."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks (nan if a side is constant)."""
    if len(x) != len(y) or len(x) < 2:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


def permutation_p(x: Sequence[float], y: Sequence[float], n_perm: int = 20000,
                  seed: int = 0, greater: bool = True) -> float:
    """One-sided p-value of ρ ≥ observed (``greater=False``: ρ ≤ observed) under random
    pairing (exact for n ≤ 8)."""
    rho = spearman(x, y)
    if not math.isfinite(rho):
        return math.nan
    y = np.asarray(y, dtype=float)
    if len(y) <= 8:
        perms = (list(p) for p in itertools.permutations(range(len(y))))
        vals = [spearman(x, y[p]) for p in perms]
    else:
        rng = np.random.default_rng(seed)
        vals = [spearman(x, y[rng.permutation(len(y))]) for _ in range(n_perm)]
    vals = np.array(vals)
    if greater:
        return float(np.mean(np.nan_to_num(vals, nan=-2.0) >= rho - 1e-12))
    return float(np.mean(np.nan_to_num(vals, nan=2.0) <= rho + 1e-12))


def rank_sum_p(low: Sequence[float], high: Sequence[float], max_splits: int = 50000,
               seed: int = 0) -> tuple[float, float]:
    """Exact one-sided permutation p-values ``(p_lower, p_higher)`` of "``low`` is below
    ``high``" and of the reverse: the share of all splits of the pooled values into groups of
    ``len(low)`` and ``len(high)`` whose ``low`` rank sum is ≤ (resp. ≥) the observed one.
    Ranks (ties averaged) make ±inf usable (a diverged run); beyond ``max_splits`` splits a
    seeded random sample of them is used."""
    n = len(low)
    if n == 0 or not len(high):
        return math.nan, math.nan
    ranks = rankdata(np.concatenate([np.asarray(low, float), np.asarray(high, float)]))
    obs = ranks[:n].sum()
    total = len(ranks)
    if math.comb(total, n) <= max_splits:
        sums = np.array([ranks[list(c)].sum() for c in itertools.combinations(range(total), n)])
    else:
        rng = np.random.default_rng(seed)
        sums = np.array([ranks[rng.permutation(total)[:n]].sum() for _ in range(max_splits)])
    return float(np.mean(sums <= obs + 1e-9)), float(np.mean(sums >= obs - 1e-9))


def _verdict(seeds: int, held: bool, p_other: float) -> str:
    """The rules of the module docstring shared by :class:`SeedTest` and :class:`EffectTest`:
    fewer than :data:`MIN_SEEDS` seeds → indicative only; else ``held`` (the test's own
    condition) → held; significant the other way → did not hold; else inconclusive."""
    if seeds < MIN_SEEDS:
        return INDICATIVE
    if held:
        return HELD
    return NOT_HELD if p_other <= ALPHA else INCONCLUSIVE


@dataclass(frozen=True)
class SeedTest:
    """One pair's test over seeds: is ``low`` below ``high``? (rules: module docstring)."""

    seeds: int
    """Same-seed pairs (seeds run on both sides)."""
    in_direction: int
    against: int
    p: float
    p_other: float
    verdict: str

    @classmethod
    def of(cls, low: dict[Any, float], high: dict[Any, float]) -> SeedTest:
        """Test per-seed values (±inf allowed, nan left out)."""
        low = {s: v for s, v in low.items() if not math.isnan(v)}
        high = {s: v for s, v in high.items() if not math.isnan(v)}
        common = [s for s in low if s in high]
        up = sum(low[s] < high[s] for s in common)
        down = sum(low[s] > high[s] for s in common)
        p, p_other = rank_sum_p(list(low.values()), list(high.values()))
        verdict = _verdict(len(common), up == len(common) and p <= ALPHA, p_other)
        return cls(len(common), up, down, p, p_other, verdict)

    def describe(self, word: str = "lower") -> str:
        return (f"{word} in {self.in_direction} of {self.seeds} seed pair(s), permutation "
                f"p = {self.p:.3f}")


def sign_flip_p(cells: Sequence[Sequence[float]], n_perm: int = 20000,
                seed: int = 0) -> tuple[float, float]:
    """One-sided p-values ``(p_up, p_down)`` of the stratified sign-flip test: ``cells`` holds,
    per cell, the same-seed differences d = high − low; the statistic is Σ_cells mean(d), and
    ``p_up`` is the share of sign flips (each pair independently) whose statistic is ≥ the
    observed one (evidence that d > 0), ``p_down`` ≤ it. Exact up to :data:`EXACT_PAIRS`
    pairs; beyond, ``n_perm`` seeded random flips with the observed one counted (so p > 0)."""
    cells = [np.asarray(c, dtype=float) for c in cells if len(c)]
    if not cells:
        return math.nan, math.nan
    d = np.concatenate(cells)
    if not np.all(np.isfinite(d)):
        raise ValueError("sign_flip_p needs finite differences")
    w = np.concatenate([np.full(len(c), 1.0 / len(c)) for c in cells])  # each cell's mean
    obs = float(w @ d)
    n = len(d)
    if n <= EXACT_PAIRS:
        signs = 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)
        stats = signs @ (w * d)
        tol = 1e-9 * max(1.0, float(np.abs(w * d).sum()))
        return float(np.mean(stats >= obs - tol)), float(np.mean(stats <= obs + tol))
    rng = np.random.default_rng(seed)
    stats = rng.choice([-1.0, 1.0], size=(n_perm, n)) @ (w * d)
    tol = 1e-9 * max(1.0, float(np.abs(w * d).sum()))
    return (float((np.sum(stats >= obs - tol) + 1) / (n_perm + 1)),
            float((np.sum(stats <= obs + tol) + 1) / (n_perm + 1)))


@dataclass(frozen=True)
class EffectTest:
    """A main effect over cells: is the ``low`` side below the ``high`` side? (rules: module
    docstring). ``cells`` holds one ``{seed: high − low}`` per cell, for seeds run on both
    sides."""

    cells: tuple[dict[Any, float], ...]
    seeds: int
    """Distinct seeds among the pairs."""
    pairs: int
    in_direction: int
    """Pairs with high > low (the claimed direction)."""
    against: int
    p: float
    p_other: float
    verdict: str

    @classmethod
    def of(cls, cells: Sequence[dict[Any, float]]) -> EffectTest:
        """Test per-cell same-seed differences (non-finite ones left out)."""
        cells = tuple({s: float(v) for s, v in c.items() if math.isfinite(v)} for c in cells)
        diffs = [list(c.values()) for c in cells]
        flat = [v for c in diffs for v in c]
        seeds = len({s for c in cells for s in c})
        p, p_other = sign_flip_p(diffs)
        verdict = _verdict(seeds, p <= ALPHA, p_other) if flat else NOT_TESTED
        return cls(cells, seeds, len(flat), sum(v > 0 for v in flat), sum(v < 0 for v in flat),
                   p, p_other, verdict)

    def describe(self, word: str = "lower") -> str:
        return (f"{word} in {self.in_direction} of {self.pairs} same-seed pair(s) over "
                f"{len(self.cells)} cell(s), {self.seeds} seed(s); sign-flip p = {self.p:.3f} "
                f"(other way {self.p_other:.3f})")


def combine(verdicts: Sequence[str]) -> str:
    """A claim's verdict from its pairs': any ``did not hold`` → did not hold; all ``held``
    → held; none → not tested; all ``indicative only`` → indicative only; else inconclusive."""
    if not verdicts:
        return NOT_TESTED
    if NOT_HELD in verdicts:
        return NOT_HELD
    if all(v == INDICATIVE for v in verdicts):
        return INDICATIVE
    return HELD if all(v == HELD for v in verdicts) else INCONCLUSIVE
