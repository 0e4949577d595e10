"""The per-tensor test of "outlier features wreck int8" (science §4, §5; issue 23): within one
run, do the quantised tensors with the larger Kurt (science §1 Eq. 1) or max/median (Eq. 2) lose
more signal, i.e. have the lower SQNR?

Each ``quant/<scheme>.json`` holds the layer report (:func:`outlierlab.quant.layer_report`): per
quantised tensor its activation SQNR (dB) and the Kurt and max/median of that tensor (a linear's
input for ``w8a8-tensor``; every site with a feature dimension for ``w8a8-paper``: the residual
stream as the FP model has it, the other sites as the quantised model sees them). Per run and
scheme: Spearman ρ(Kurt, SQNR) and ρ(max/median, SQNR) over its tensors (the claim expects
ρ < 0). Across runs: one point per configuration (the mean of its seeds' ρ, seeds being
replicates), and the exact one-sided sign test of "ρ < 0" over configurations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from outlierlab.experiments.results import RunRecord, finished_quant_results
from outlierlab.experiments.significance import spearman

MIN_TENSORS = 4
"""Fewest tensors with a Kurt and a finite SQNR for a run's ρ."""


@dataclass
class SiteTest:
    """One run under one scheme: ρ over its quantised tensors."""

    run: str
    config: Any  # the run's identity (seeds pooled)
    arch: str
    scheme: str
    points: list[dict[str, Any]]  # name, kind, kurtosis, mmr, sqnr
    rho_kurt: float
    rho_mmr: float

    @property
    def n(self) -> int:
        return len(self.points)


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def site_points(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The tensors of one quantisation result with a Kurt and a finite activation SQNR."""
    out = []
    for row in result.get("layers") or []:
        if isinstance(row, dict) and _finite(row.get("kurtosis")) \
                and _finite(row.get("act_sqnr_db")):  # fmt: skip
            out.append({"name": row.get("name"), "kind": row.get("kind"),
                        "kurtosis": float(row["kurtosis"]),
                        "mmr": float(row["mmr"]) if _finite(row.get("mmr")) else math.nan,
                        "sqnr": float(row["act_sqnr_db"])})
    return out


def site_tests(runs: Sequence[RunRecord]) -> list[SiteTest]:
    """Every (finished run, scheme) whose layer report has ``MIN_TENSORS`` tensors or more."""
    tests = []
    for r, scheme, result in finished_quant_results(runs):
        pts = site_points(result)
        if len(pts) < MIN_TENSORS:
            continue
        sqnr = [p["sqnr"] for p in pts]
        mmr = [(p["mmr"], p["sqnr"]) for p in pts if math.isfinite(p["mmr"])]
        tests.append(SiteTest(
            r.name, r.identity(), r.arch, scheme, pts,
            spearman([p["kurtosis"] for p in pts], sqnr),
            spearman(*zip(*mmr, strict=True)) if len(mmr) >= MIN_TENSORS else math.nan))
    return tests


def config_means(values: Iterable[tuple[Any, float]]) -> list[float]:
    """One value per configuration from ``(configuration, value)`` pairs: the mean of its
    seeds' values (seeds are replicates, not independent configurations)."""
    cells: dict[Any, list[float]] = {}
    for config, v in values:
        cells.setdefault(config, []).append(v)
    return [float(np.mean(v)) for v in cells.values()]


def sign_test_p(k: int, n: int) -> float:
    """P(X ≥ k) for X ~ Binomial(n, 1/2): the exact one-sided sign test (1.0 for n = 0)."""
    return float(sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n) if n else 1.0


def summary(tests: Sequence[SiteTest]) -> list[dict[str, Any]]:
    """Per scheme: runs, configurations (seed-mean ρ), how many have ρ(Kurt, SQNR) < 0 and the
    sign test's one-sided p over configurations; the median ρ's."""
    out = []
    for scheme in sorted({t.scheme for t in tests}):
        ts = [t for t in tests if t.scheme == scheme and math.isfinite(t.rho_kurt)]
        if not ts:
            continue
        means = config_means((t.config, t.rho_kurt) for t in ts)
        k = sum(m < 0 for m in means)
        mmr = [t.rho_mmr for t in ts if math.isfinite(t.rho_mmr)]
        out.append({"scheme": scheme, "runs": len(ts), "runs_negative": sum(t.rho_kurt < 0
                                                                            for t in ts),
                    "configurations": len(means), "configurations_negative": k,
                    "p": sign_test_p(k, len(means)),
                    "median_rho_kurt": float(np.median([t.rho_kurt for t in ts])),
                    "median_rho_mmr": float(np.median(mmr)) if mmr else math.nan,
                    "tensors": int(np.median([t.n for t in ts]))})
    return out


def _f(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{x:+.2f}"


def summary_lines(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One sentence per scheme for the report."""
    return [f"{s['scheme']}: ρ(Kurt, SQNR) < 0 in {s['runs_negative']} of {s['runs']} runs and "
            f"{s['configurations_negative']} of {s['configurations']} configurations (seed-mean "
            f"ρ; one-sided sign test p = {s['p']:.3f}); median ρ(Kurt, SQNR) "
            f"{_f(s['median_rho_kurt'])}, ρ(max/median, SQNR) {_f(s['median_rho_mmr'])}, "
            f"{s['tensors']} tensors per run" for s in rows]


def table(tests: Sequence[SiteTest]) -> tuple[list[str], list[list[str]]]:
    """The per-run table: run, scheme, tensors, the two ρ's, the lowest-SQNR tensor."""
    header = ["run", "scheme", "tensors", "ρ(Kurt, SQNR)", "ρ(max/median, SQNR)",
              "lowest SQNR (Kurt)"]
    rows = []
    for t in tests:
        worst = min(t.points, key=lambda p: p["sqnr"])
        rows.append([t.run, t.scheme, str(t.n), _f(t.rho_kurt), _f(t.rho_mmr),
                     f"{worst['name']} {worst['sqnr']:.1f} dB ({worst['kurtosis']:.1f})"])
    return header, rows


def figure(tests: Sequence[SiteTest], path: Path) -> Path | None:
    """Left: every tensor's Kurt (log) against its SQNR under the first scheme present of
    ``w8a8-paper``, ``w8a8-tensor`` (one colour per block); right: each run's ρ(Kurt, SQNR) by
    scheme."""
    if not tests:
        return None
    import matplotlib.pyplot as plt

    from outlierlab.experiments.figures import _colour, _save

    schemes = sorted({t.scheme for t in tests})
    main = next((s for s in ("w8a8-paper", "w8a8-tensor") if s in schemes), schemes[0])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    seen = set()
    for t in (t for t in tests if t.scheme == main):
        ax.scatter([p["kurtosis"] for p in t.points], [p["sqnr"] for p in t.points], s=9,
                   alpha=0.6, color=_colour(t.arch), label=None if t.arch in seen else t.arch)
        seen.add(t.arch)
    ax.set_xscale("log")
    ax.set_xlabel("Kurt of the quantised tensor")
    ax.set_ylabel("activation SQNR (dB)")
    ax.set_title(f"{main}: every quantised tensor of every run", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    for i, s in enumerate(schemes):
        rhos = [t.rho_kurt for t in tests if t.scheme == s and math.isfinite(t.rho_kurt)]
        jitter = np.linspace(-0.15, 0.15, len(rhos)) if len(rhos) > 1 else [0.0]
        bx.scatter(np.full(len(rhos), i) + jitter, rhos, s=12,
                   color=[_colour(t.arch) for t in tests
                          if t.scheme == s and math.isfinite(t.rho_kurt)])
    bx.axhline(0, color="k", lw=0.8)
    bx.set_xticks(range(len(schemes)), schemes, fontsize=8)
    bx.set_ylim(-1.05, 1.05)
    bx.set_ylabel("ρ(Kurt, SQNR) per run")
    bx.set_title("the claim expects ρ < 0", fontsize=9)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)
