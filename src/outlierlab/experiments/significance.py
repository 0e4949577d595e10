"""Seed statistics for the claims (docs/reproduce.md "Verdicts"): ranks, Spearman's ρ, exact
one-sided permutation tests, and one pair's verdict over seeds.

- :func:`rank_sum_p`: the exact permutation test of "``low`` is below ``high``" on ranks (the
  Mann–Whitney form): every split of the pooled runs into groups of the two sizes is counted.
  With 3 values a side the smallest p is 1/20; with 2, 1/6; with 1, 1/2.
- :class:`SeedTest`: ``held`` when every same-seed pair is in the direction *and* p ≤ ALPHA;
  ``did not hold`` when significant the other way or every pair (2 or more) is against;
  ``inconclusive`` otherwise. :func:`combine` gives a claim's verdict from its pairs'.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

HELD, NOT_HELD, INCONCLUSIVE, NOT_TESTED = "held", "did not hold", "inconclusive", "not tested"
ALPHA = 0.1
"""Largest one-sided permutation p-value a verdict ``held`` accepts."""
MIN_SEEDS = 3
"""Seeds per side below which no pair can reach p ≤ ALPHA (3 v 3: p ≥ 1/20)."""


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
        if common and up == len(common) and p <= ALPHA:
            verdict = HELD
        elif p_other <= ALPHA or (len(common) >= 2 and down == len(common)):
            verdict = NOT_HELD
        else:
            verdict = INCONCLUSIVE
        return cls(len(common), up, down, p, p_other, verdict)

    def describe(self, word: str = "lower") -> str:
        return (f"{word} in {self.in_direction} of {self.seeds} seed pair(s), permutation "
                f"p = {self.p:.3f}")


def combine(verdicts: Sequence[str]) -> str:
    """A claim's verdict from its pairs': any ``did not hold`` → did not hold; all ``held``
    → held; none → not tested; else inconclusive."""
    if not verdicts:
        return NOT_TESTED
    if NOT_HELD in verdicts:
        return NOT_HELD
    return HELD if all(v == HELD for v in verdicts) else INCONCLUSIVE
