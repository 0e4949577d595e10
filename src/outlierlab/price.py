"""``outlierlab price``: what a model's outlier features cost under common W8A8 schemes and the
schemes people serve with (FP8, W4A16 RTN / GPTQ, W4A4 QuaRot, SmoothQuant with α searched), as
one page (Markdown + HTML + PNG figures + JSON).

Pipeline (all on the same windows; calibration batches from the train split, science §4):

1. the massive-activation profile (:mod:`outlierlab.profile`) on the first ``stats_windows``
   validation windows: per-layer Kurt (Eq. 1), max |x| and where it sits, attention sinks;
2. FP perplexity on the ``eval_windows`` validation windows, once;
3. per scheme, :func:`outlierlab.quant.quantize_and_evaluate` (quantised perplexity and the
   per-layer activation SQNR): ``w8a8-tensor``, ``w8a8-dynamic``, ``w8a8-paper``, SmoothQuant
   α = 0.5 and 0.8 on ``w8a8-tensor``, and the rotation baseline
   (:func:`outlierlab.quant.rotate.rotate`, Llama family) quantised with ``w8a8-tensor``;
   then ``fp8-tensor``, ``fp8-dynamic``, ``w4a16-rtn``, ``w4a16-gptq``, ``w4a4-quarot`` and
   ``smoothquant-search`` (:data:`outlierlab.quant.SCHEMES`).

Work is shared (:class:`outlierlab.quant.CalibCache`, one per model; results unchanged):
``w8a8-paper`` runs first so that its calibration pass also gives ``w8a8-tensor``'s ranges and
weights; one SmoothQuant statistics pass serves every α (``smoothquant-search`` included, and
the fixed-α rows' ranges its chosen α when that is 0.5 or 0.8); ``w4a4-quarot``'s rotated copy has
a cache of its own. Calibration passes per scheme (counted on a tiny model,
``tests/integration/test_quant_serving.py``): w8a8-paper 1, w8a8-tensor 0, w8a8-dynamic 0,
SmoothQuant α = 0.5 2 (statistics, ranges), α = 0.8 1, rotation 1, fp8-tensor 1, fp8-dynamic 0,
w4a16-rtn 0, w4a16-gptq 1 (XᵀX), w4a4-quarot 1 (XᵀX of the rotated copy), smoothquant-search 6
(one calibration cross-entropy pass per α) + 1 (ranges of the chosen α unless 0.5 or 0.8); plus
one evaluation of the validation windows each. ``stage_seconds`` in the result
(and the page's intro) says where the time went.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from outlierlab.errors import ConfigError

ROTATION = "rotation + w8a8-tensor"


def schemes() -> list[tuple[str, Any]]:
    """(label, QuantConfig or ROTATION) in page order."""
    from outlierlab.quant import scheme

    return [
        ("w8a8-tensor", scheme("w8a8-tensor")),
        ("w8a8-dynamic", scheme("w8a8-dynamic")),
        ("w8a8-paper", scheme("w8a8-paper")),
        ("smoothquant α=0.5", scheme("w8a8-tensor", smooth_alpha=0.5)),
        ("smoothquant α=0.8", scheme("w8a8-tensor", smooth_alpha=0.8)),
        (ROTATION, scheme("w8a8-tensor")),
        ("fp8-tensor", scheme("fp8-tensor")),
        ("fp8-dynamic", scheme("fp8-dynamic")),
        ("w4a16-rtn", scheme("w4a16-rtn")),
        ("w4a16-gptq", scheme("w4a16-gptq")),
        ("w4a4-quarot", scheme("w4a4-quarot")),
        ("smoothquant-search", scheme("smoothquant-search")),
    ]


DEFAULT_SCHEMES = ("w8a8-tensor", "w8a8-dynamic", "fp8-dynamic", "w4a16-rtn")
"""The page's rows unless asked for others (``--schemes``; ``--schemes all``: every row of
:func:`schemes`): what outlier features cost at int8 with one static range per tensor against
one range per token, and the two formats most served (FP8 with per-token scales, 4-bit
weights). Four evaluations keep a 135M model's page within two minutes on two cores
(benchmarks/real_model.py)."""


def row_labels(asked: Sequence[str] | None) -> list[str]:
    """The rows for ``--schemes asked`` in page order: None → :data:`DEFAULT_SCHEMES`, ``["all"]``
    → every row; a label that is not a row is a :class:`ConfigError` naming the allowed ones."""
    labels = [label for label, _ in schemes()]
    if asked is None:
        return list(DEFAULT_SCHEMES)
    if list(asked) == ["all"]:
        return labels
    if unknown := [x for x in asked if x not in labels]:
        raise ConfigError(f"--schemes {unknown[0]!r} is not allowed; allowed: all, "
                          f"{', '.join(labels)}")  # fmt: skip
    return [label for label in labels if label in asked]


def _compute_order(label: str) -> int:
    """``w8a8-paper`` first (its ranges serve ``w8a8-tensor``), ``smoothquant-search`` last (the
    fixed-α rows' statistics pass serves it, and their ranges serve the chosen α if it is 0.5 or
    0.8), the rest in page order."""
    return {"w8a8-paper": 0, "smoothquant-search": 2}.get(label, 1)


def run_price(
    model: nn.Module,
    calib: list[torch.Tensor],
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    batch_size: int = 8,
    stats_windows: int = 4,
    progress: Callable[[str], None] | None = None,
    points: str | Sequence[str] = "auto",
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The whole comparison (module docstring); ``progress(label)`` is called as each stage
    ends (the CLI's progress bar); ``points``: where the profile measures (monitor globs;
    ``auto``: the residual stream); ``labels``: these rows of :func:`schemes` (None:
    :data:`DEFAULT_SCHEMES`; see :func:`row_labels`).
    Returns the JSON-able result."""
    from outlierlab.profile import profile
    from outlierlab.quant import CalibCache, perplexity, quantize_and_evaluate
    from outlierlab.quant.rotate import rotate

    stage_done = progress or (lambda label: None)
    t_start = time.perf_counter()
    sx = val_x[: max(1, min(stats_windows, val_x.shape[0]))]
    prof = profile(model, sx, batch_size, points)
    stage_done("profile")
    kurts = {p["name"]: p["kurtosis"] for p in prof["points"]}
    finite = [k for k in kurts.values() if math.isfinite(k)]
    resid = {
        "points": kurts,
        "kurtosis_mean": sum(finite) / len(finite) if finite else math.nan,
        "kurtosis_max": max(finite, default=math.nan),
    }
    t0 = time.perf_counter()
    fp_ppl, fp_loss = perplexity(model, val_x, val_y, batch_size)
    t_fp = time.perf_counter()
    fp = {"ppl": fp_ppl, "loss": fp_loss, "seconds": t_fp - t0}
    stage_done("FP perplexity")
    stages = {"profile": t0 - t_start, "fp_eval": fp["seconds"]}
    chosen = row_labels(labels)
    order = [s for s in schemes() if s[0] in chosen]
    rows: dict[str, dict[str, Any]] = {}
    caches = {"model": CalibCache(), "rotated": CalibCache()}  # one per model (CalibCache)
    for label, cfg in sorted(order, key=lambda s: _compute_order(s[0])):  # sharing (CalibCache)
        target = model
        t0 = time.perf_counter()
        try:
            if label == ROTATION:
                target = rotate(model)
            # layer_kurtosis off: the page shows the residual stream's Kurt, from the profile
            opts = dict(fp=fp, resid=resid, layer_kurtosis=False)
            cache = caches["rotated" if label == ROTATION else "model"]
            res = quantize_and_evaluate(
                target, cfg, calib, val_x, val_y, batch_size, stats_windows, cache=cache, **opts
            )
        except ConfigError as exc:  # a rotation on a model that is not Llama-family
            if label != ROTATION and cfg.rotation is None:
                raise
            rows[label] = {"label": label, "error": str(exc)}
            stage_done(label)
            continue
        res.update(label=label, seconds=time.perf_counter() - t0)
        stages[label] = res["seconds"]
        rows[label] = res
        stage_done(label)
    return {
        "fp_ppl": fp_ppl,
        "eval_windows": int(val_x.shape[0]),
        "seq_len": int(val_x.shape[1]),
        "stats_windows": int(sx.shape[0]),
        "calib_batches": len(calib),
        "calib_tokens": int(sum(b.numel() for b in calib)),
        "profile": prof,
        "schemes": [rows[label] for label, _ in order],
        "seconds": time.perf_counter() - t_start,
        "stage_seconds": stages,
    }


# --- the page ---------------------------------------------------------------------------------


def _f(v: Any, spec: str = ".2f") -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def scheme_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["scheme", "perplexity", "increase", "worst linear (act SQNR dB)", "median act SQNR"]
    rows = [["FP", _f(res["fp_ppl"], ".3f"), "—", "—", "—"]]
    for r in res["schemes"]:
        if "error" in r:
            rows.append([r["label"], "n/a", "—", "not applicable (see price.json)", "—"])
            continue
        lin = [x for x in r["layers"] if x["kind"] == "linear" and x["act_sqnr_db"] is not None]
        worst = min(lin, key=lambda x: x["act_sqnr_db"], default=None)
        sq = sorted(x["act_sqnr_db"] for x in lin)
        rows.append([
            r["label"] + (f" (α={r['smooth_alpha']:.1f})" if "smooth_search_ce" in r else ""),
            _f(r["quant_ppl"], ".3f"), f"{100 * (r['ppl_ratio'] - 1):+.1f} %",
            "—" if worst is None else f"{worst['name']} ({worst['act_sqnr_db']:.1f})",
            _f(sq[len(sq) // 2] if sq else None, ".1f"),
        ])  # fmt: skip
    return header, rows


def massive_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["point", "Kurt", "Kurt w/o token 0", "max |x|", "window:token", "channel",
              "max/median", "OSP kurt"]  # fmt: skip
    rows = []
    for p in res["profile"]["points"]:
        top = p["top"][0] if p["top"] else {}
        rows.append([
            p["name"], _f(p["kurtosis"], ".1f"), _f(p["kurtosis_no_first"], ".1f"),
            _f(top.get("value"), ".4g"), f"{top.get('window')}:{top.get('token')}",
            str(top.get("channel")), _f(p["max_median_ratio"], ".0f"),
            _f(p["token_excess_kurtosis"], ".1f"),
        ])  # fmt: skip
    return header, rows


def sink_table(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [
        [a["layer"], str(a["heads"]), _f(a["sink_share"]), _f(a["mass_token0"], ".3f")]
        for a in res["profile"].get("attention") or []
    ]
    return ["layer", "heads", "share of heads > 0.5 on token 0", "mean mass on token 0"], rows


def _figures(res: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from outlierlab.safe_io import save_figure

    pts = res["profile"]["points"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    xs = range(len(pts))
    ax[0].plot(xs, [p["kurtosis"] for p in pts], "o-", label="all tokens")
    ax[0].plot(xs, [p["kurtosis_no_first"] for p in pts], "s--", label="without token 0")
    ax[0].set(yscale="log", xlabel="point (0 = embedding, i+1 = block i output)",
              ylabel="Kurt (Eq. 1)", title="residual-stream kurtosis")  # fmt: skip
    ax[0].legend()
    ax[1].plot(xs, [p["max_abs"] for p in pts], "o-", color="tab:red", label="max |x|")
    ax[1].plot(xs, [p["median_abs"] for p in pts], "o-", color="tab:grey", label="median |x|")
    ax[1].set(yscale="log", xlabel="point", title="largest activation")
    ax[1].legend()
    fig.tight_layout()
    figs = [("price_kurt.png", "Per-layer Kurt and max |x|")]
    save_figure(fig, out / figs[0][0], dpi=110)  # atomic: no 0-byte PNG on a full disk
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(11, 3.6))
    for r in res["schemes"]:
        lin = [x for x in r.get("layers", []) if x["kind"] == "linear"]
        if lin:
            ax.plot([x["act_sqnr_db"] if x["act_sqnr_db"] is not None else float("nan")
                     for x in lin], ".-", label=r["label"], lw=0.8)  # fmt: skip
    ax.set(xlabel="linear layer (model order)", ylabel="input SQNR (dB)",
           title="activation quantisation error per linear layer (higher is better)")  # fmt: skip
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    figs.append(("price_sqnr.png", "Per-layer activation SQNR per scheme"))
    save_figure(fig, out / figs[1][0], dpi=110)  # atomic: no 0-byte PNG on a full disk
    plt.close(fig)
    return figs


def write_page(res: dict[str, Any], out: str | Path, title: str,
               figures: bool = True) -> dict[str, Path]:  # fmt: skip
    """Write ``price.md``, ``price.html``, ``price.json`` and (``figures``) the PNG figures into
    ``out``."""
    from outlierlab.experiments.report import html_table, md_table
    from outlierlab.jsonable import write_json
    from outlierlab.safe_io import write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figs = _figures(res, out) if figures else []
    intro = (
        f"{res['eval_windows']} validation windows × {res['seq_len']} tokens for perplexity; "
        f"profile and per-layer statistics on the first {res['stats_windows']}; calibration on "
        f"{res['calib_batches']} train batches ({res['calib_tokens']} tokens); "
        f"{res['seconds']:.0f} s in all."
    )
    stages = res.get("stage_seconds") or {}
    if stages:
        intro += " Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + "."
    sections = [
        ("Perplexity per scheme", scheme_table(res)),
        ("Where the massive activations sit (Sun et al. 2024)", massive_table(res)),
        ("Attention sinks", sink_table(res)),
    ]
    md = [f"# {title}", "", intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>"]
    for name, (header, rows) in sections:
        if rows:
            md += [f"## {name}", "", md_table(header, rows), ""]
            body += [f"<h2>{html.escape(name)}</h2>", html_table(header, rows)]
    for fname, caption in figs:
        md += [f"![{caption}]({fname})", ""]
        body.append(f'<figure><img src="{fname}"><figcaption>{caption}</figcaption></figure>')
    paths = {"md": out / "price.md", "html": out / "price.html", "json": out / "price.json"}
    write_text(paths["md"], "\n".join(md))
    style = "body{font-family:sans-serif;max-width:1100px}td,th{padding:2px 8px;text-align:right}"
    write_text(
        paths["html"],
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n"
    )
    write_json(paths["json"], res)
    return paths
