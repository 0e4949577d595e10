"""Which measurement predicts a layer's quantisation damage, on the user's own model (science
§4; "Beyond Outliers", ICLR 2026, finds kurtosis and the max-median ratio can fail to).

Over the blocks of a model, Spearman's ρ between the block's sensitivity (the damage when only
its linears are quantised, ``alone``, over every block, and the damage keeping them in 16-bit
recovers, ``without``, over the searched blocks that have it; :mod:`outlierlab.quant.sensitivity`)
and each candidate predictor:

- Kurt (science §1.2 Eq. 1), Kurt without token 0, max|x|/median (§1.3 Eq. 2) and OSP's per-token
  excess kurtosis of the residual stream at the block's output (the profile's
  ``blocks.{i}.resid_post``, :mod:`outlierlab.profile`, science §1.8);
- the activation SQNR and the weight SQNR of the block's worst linear (lowest dB) under the
  scheme (a damage predictor with the opposite sign: ρ < 0 when it predicts);
- the output error: ‖z_L − z‖ / ‖z‖ of the logits when only the block is quantised, the
  error-propagation measure "Beyond Outliers" proposes.

ρ is Pearson's correlation of the ranks, ties taking their average rank (:func:`spearman`;
scipy.stats.spearmanr's definition, without depending on scipy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from outlierlab.experiments import significance

SENSITIVITY_WINDOWS = 2
"""Evaluation windows the sensitivity search uses by default (``price --sensitivity-windows``,
whose parser spells the 2 itself so that the CLI starts without torch; ``quantize
--predictors``): it runs about 40–80 evaluations."""

PREDICTORS = (
    ("Kurt", "kurtosis", +1),
    ("Kurt w/o token 0", "kurtosis_no_first", +1),
    ("max|x| / median", "max_median_ratio", +1),
    ("OSP per-token kurtosis", "token_excess_kurtosis", +1),
    ("activation SQNR (worst linear)", "act_sqnr_db", -1),
    ("weight SQNR (worst linear)", "weight_sqnr_db", -1),
    ("output error when only this block is quantised", "output_error", +1),
)
"""(label, key, the sign ρ has when the measurement predicts damage)."""


def spearman(a: Sequence[float | None], b: Sequence[float | None]) -> float | None:
    """Spearman's ρ (:func:`outlierlab.experiments.significance.spearman`) of the pairs where
    both values are finite (None with fewer than 3 such pairs, or if either side is constant on
    them)."""
    if len(a) != len(b):
        raise ValueError(f"spearman needs equal lengths; got {len(a)} and {len(b)}")
    def ok(v: float | None) -> bool:
        return v is not None and math.isfinite(v)

    pairs = [(float(x), float(y)) for x, y in zip(a, b) if ok(x) and ok(y)]
    if len(pairs) < 3:
        return None
    rho = significance.spearman([p[0] for p in pairs], [p[1] for p in pairs])
    return rho if math.isfinite(rho) else None


def block_predictors(sens: dict[str, Any], profile: dict[str, Any]) -> list[dict[str, Any]]:
    """Per block of ``sens`` (a :func:`~outlierlab.quant.sensitivity.layer_sensitivity` result):
    its sensitivity and every predictor's value (None where not measured), in block order."""
    points = {p["name"]: p for p in profile.get("points", [])}
    stats = {r["name"]: r for r in sens.get("layer_stats", [])}
    out = []
    for row in sens["blocks"]:
        if not row["name"].startswith("blocks."):
            continue
        p = points.get(f"{row['name']}.resid_post", {})
        lin = [stats[n] for n in sens["groups"].get(row["name"], []) if n in stats]

        def worst(key: str, lin=lin) -> float | None:
            vals = [r[key] for r in lin if r.get(key) is not None]
            return min(vals) if vals else None

        out.append({
            "block": row["name"], "alone_kl": row["alone_kl"], "without_kl": row["without_kl"],
            **{k: p.get(k) for k in ("kurtosis", "kurtosis_no_first", "max_median_ratio",
                                     "token_excess_kurtosis")},
            "act_sqnr_db": worst("act_sqnr_db"), "weight_sqnr_db": worst("weight_sqnr_db"),
            "output_error": row.get("output_error"),
        })  # fmt: skip
    out.sort(key=lambda r: int(r["block"].split(".")[1]))
    return out


def predictor_table(sens: dict[str, Any], profile: dict[str, Any]) -> dict[str, Any]:
    """``{"blocks": per-block values, "rows": [{"predictor", "key", "sign", "rho_alone",
    "rho_without", "n"}]}``: Spearman's ρ of each predictor against both sensitivities."""
    blocks = block_predictors(sens, profile)
    rows = []
    for label, key, sign in PREDICTORS:
        vals = [b[key] for b in blocks]
        n = sum(v is not None and math.isfinite(v) for v in vals)
        rows.append({
            "predictor": label, "key": key, "sign": sign, "n": n,
            "rho_alone": spearman(vals, [b["alone_kl"] for b in blocks]),
            "rho_without": spearman(vals, [b["without_kl"] for b in blocks]),
        })  # fmt: skip
    return {"blocks": blocks, "rows": rows}


def measure_predictors(model: nn.Module, cfg: Any, calib: Sequence[torch.Tensor],
                       x: torch.Tensor, y: torch.Tensor, batch_size: int = 4,
                       stats_windows: int = 4, windows: int = SENSITIVITY_WINDOWS,
                       points: str | Sequence[str] = "auto", cache: Any = None,
                       ) -> dict[str, Any]:  # fmt: skip
    """The predictor table of one model under scheme ``cfg`` (rotation-free), on its own: the
    profile on the first ``stats_windows`` windows of x, the layer sensitivity on the first
    ``windows`` (:func:`~outlierlab.quant.sensitivity.layer_sensitivity`; ``cache`` shares
    calibration with an evaluation of the same scheme), and :func:`predictor_table`, with the
    verified 16-bit recommendation's size and recovery (``outlierlab quantize --predictors``,
    one per run of a sweep)."""
    from outlierlab.profile import profile
    from outlierlab.quant.sensitivity import layer_sensitivity

    prof = profile(model, x[: max(1, min(stats_windows, x.shape[0]))], batch_size, points)
    n = max(1, min(windows, x.shape[0]))
    sens = layer_sensitivity(model, cfg, calib, x[:n], y[:n], batch_size, cache=cache)
    rec = sens["recommendation"]
    return {**predictor_table(sens, prof), "scheme": cfg.name, "windows": n,
            "full_kl": sens["full"]["kl"], "linears": len(sens["ranking"]),
            "keep_16bit": rec["keep_16bit"], "verified_recovery": rec["verified_recovery"]}
