"""Which measurement predicts a block's quantisation damage, across the runs of a sweep (issue 22,
science §4).

Each rotation-free ``quant/<scheme>.json`` of a sweep holds the run's predictor table
(``outlierlab quantize --predictors``, :func:`outlierlab.quant.predictors.measure_predictors`):
over the run's blocks, Spearman ρ between the damage of quantising the block alone and each
candidate predictor (Kurt, Kurt without token 0, max|x|/median, OSP's per-token kurtosis, the
worst linear's activation and weight SQNR, the output error). With a few blocks per run one ρ is
coarse (4 blocks: ρ ∈ {−1, −0.8, …, 1}); across runs, per scheme and predictor:

- the median ρ over runs;
- one point per configuration (the mean of its seeds' ρ, seeds being replicates), and the exact
  one-sided sign test that the predictor points the right way (ρ > 0 for a damage measure,
  ρ < 0 for an SQNR) in more configurations than chance (:func:`~.mechanism.sign_test_p`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from outlierlab.experiments.mechanism import config_means, sign_test_p
from outlierlab.experiments.results import RunRecord, finished_quant_results
from outlierlab.quant.predictors import PREDICTORS

ABOUT = (
    "Per run, the damage (KL from the FP model) of quantising each block alone, and Spearman ρ "
    "over the run's blocks between it and each predictor (`outlierlab quantize --predictors`; "
    "the same table `outlierlab price --sensitivity` puts on a model's page). A predictor "
    "points the right way when ρ > 0 (ρ < 0 for an SQNR). Across runs: the median ρ, and per "
    "configuration the mean of its seeds' ρ with the exact one-sided sign test that it points "
    "the right way in more configurations than chance. With few blocks per run one ρ is coarse; "
    "the count over configurations is the evidence.")


@dataclass
class RunPredictors:
    """One run's predictor table under one scheme."""

    run: str
    config: Any  # the run's identity (seeds pooled)
    arch: str
    scheme: str
    blocks: int
    rho: dict[str, float]  # predictor key → ρ with the damage alone (nan where undefined)


def _rho(v: Any) -> float:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    return float(v) if ok else math.nan


def gather(runs: Sequence[RunRecord]) -> list[RunPredictors]:
    """Every (finished run, scheme) whose quantisation result carries a predictor table."""
    out = []
    for r, scheme, result in finished_quant_results(runs):
        pred = result.get("predictors")
        if not isinstance(pred, dict) or not isinstance(pred.get("rows"), list):
            continue
        rho = {row.get("key"): _rho(row.get("rho_alone")) for row in pred["rows"]
               if isinstance(row, dict)}  # fmt: skip
        out.append(RunPredictors(r.name, r.identity(), r.arch, scheme,
                                 len(pred.get("blocks") or []), rho))
    return out


def summary(found: Sequence[RunPredictors]) -> list[dict[str, Any]]:
    """Per scheme and predictor (in :data:`PREDICTORS` order; none without a run that has its
    ρ): runs with a ρ, its median, configurations, those whose seed-mean ρ points the right way,
    and the sign test's p."""
    out = []
    for scheme in sorted({f.scheme for f in found}):
        of = [f for f in found if f.scheme == scheme]
        for label, key, sign in PREDICTORS:
            rhos = [(f.config, f.rho.get(key, math.nan)) for f in of]
            rhos = [(c, v) for c, v in rhos if math.isfinite(v)]
            if not rhos:  # e.g. runs with fewer than 3 blocks
                continue
            means = config_means(rhos)
            right = sum(sign * m > 0 for m in means)
            out.append({
                "scheme": scheme, "predictor": label, "key": key, "sign": sign,
                "runs": len(rhos), "median_rho": float(np.median([v for _, v in rhos])),
                "configurations": len(means), "configurations_right": right,
                "p": sign_test_p(right, len(means)),
                "blocks": int(np.median([f.blocks for f in of])) if of else 0,
            })  # fmt: skip
    return out


def table(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """The report's table: one row per scheme and predictor."""
    header = ["scheme", "predictor (per block)", "runs", "median ρ with damage",
              "configurations where it points the right way", "sign test p", "right way"]
    body = []
    for s in rows:
        med = "–" if not math.isfinite(s["median_rho"]) else f"{s['median_rho']:+.2f}"
        body.append([s["scheme"], s["predictor"], str(s["runs"]), med,
                     f"{s['configurations_right']} of {s['configurations']}",
                     f"{s['p']:.3f}", "ρ > 0" if s["sign"] > 0 else "ρ < 0"])
    return header, body


def figure(found: Sequence[RunPredictors], path: Path) -> Path | None:
    """Each run's ρ per predictor, signed so that up is "predicts the damage", under the first
    scheme present of ``w8a8-tensor`` and the others (one colour per block type)."""
    if not found:
        return None
    import matplotlib.pyplot as plt

    from outlierlab.experiments.figures import _colour, _save

    schemes = sorted({f.scheme for f in found})
    main = "w8a8-tensor" if "w8a8-tensor" in schemes else schemes[0]
    of = [f for f in found if f.scheme == main]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    seen = set()
    for i, (_label, key, sign) in enumerate(PREDICTORS):
        pts = [(f, sign * f.rho.get(key, math.nan)) for f in of]
        pts = [(f, v) for f, v in pts if math.isfinite(v)]
        jitter = np.linspace(-0.25, 0.25, len(pts)) if len(pts) > 1 else [0.0]
        for (f, v), j in zip(pts, jitter):
            ax.scatter(i + j, v, s=10, alpha=0.7, color=_colour(f.arch),
                       label=None if f.arch in seen else f.arch)
            seen.add(f.arch)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(PREDICTORS)),
                  [label.replace(" when only this block is quantised", "")
                   .replace(" (worst linear)", "") for label, _, _ in PREDICTORS],
                  fontsize=7, rotation=20, ha="right")  # fmt: skip
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("ρ with block damage, signed\n(up: predicts it)")
    ax.set_title(f"{main}: which measurement predicts a block's damage, per run", fontsize=9)
    ax.grid(alpha=0.3)
    if seen:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
