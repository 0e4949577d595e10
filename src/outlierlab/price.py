"""``outlierlab price``: what a model's outlier features cost under common W8A8 schemes and the
schemes people serve with (FP8, W4A16 RTN / GPTQ, W4A4 QuaRot, SmoothQuant with α searched), as
one page (Markdown + HTML + PNG figures + JSON).

Pipeline (all on the same windows; calibration batches from the train split, science §4):

1. the massive-activation profile (:mod:`outlierlab.profile`) on the first ``stats_windows``
   validation windows: per-layer Kurt (Eq. 1), max |x| and where it sits, attention sinks;
2. FP perplexity on the ``eval_windows`` validation windows, once;
3. per scheme, :func:`outlierlab.quant.quantize_and_evaluate` (quantised perplexity and the
   per-layer activation SQNR): ``w8a8-tensor``, ``w8a8-dynamic``, ``w8a8-outputs``, SmoothQuant
   α = 0.5 and 0.8 on ``w8a8-tensor``, and the rotation baseline
   (:func:`outlierlab.quant.rotate.rotate`, Llama family) quantised with ``w8a8-tensor``;
   then ``fp8-tensor``, ``fp8-dynamic``, ``w4a16-rtn``, ``w4a16-gptq``, ``w4a4-quarot`` and
   ``smoothquant-search`` (:data:`outlierlab.quant.SCHEMES`).

Work is shared (:class:`outlierlab.quant.CalibCache`, one per model; results unchanged):
``w8a8-outputs`` runs first so that its calibration pass also gives ``w8a8-tensor``'s ranges and
weights; one SmoothQuant statistics pass serves every α (``smoothquant-search`` included, and
the fixed-α rows' ranges its chosen α when that is 0.5 or 0.8); ``w4a4-quarot``'s rotated copy has
a cache of its own. Calibration passes per scheme (counted on a tiny model,
``tests/integration/test_quant_serving.py``): w8a8-outputs 1, w8a8-tensor 0, w8a8-dynamic 0,
SmoothQuant α = 0.5 2 (statistics, ranges), α = 0.8 1, rotation 1, fp8-tensor 1, fp8-dynamic 0,
w4a16-rtn 0, w4a16-gptq 1 (XᵀX), w4a4-quarot 1 (XᵀX of the rotated copy), smoothquant-search 6
(one calibration cross-entropy pass per α) + 1 (ranges of the chosen α unless 0.5 or 0.8); plus
one evaluation of the validation windows each. ``stage_seconds`` in the result
(and the page's intro) says where the time went.

Optional stages (``--sensitivity``, ``--crosscheck``, ``--full``; issue 22): the layer sensitivity
of one scheme with its verified 16-bit recommendation (:mod:`outlierlab.quant.sensitivity`,
calibration from the page's cache) and the predictor table (:mod:`outlierlab.quant.predictors`),
and our ``w8a8-dynamic`` against torchao's real int8 path (:mod:`outlierlab.quant.crosscheck`).
The page opens with :func:`headline`; :func:`write_compare` puts several models side by side.
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
from outlierlab.quant.predictors import SENSITIVITY_WINDOWS

ROTATION = "rotation + w8a8-tensor"


def schemes() -> list[tuple[str, Any]]:
    """(label, QuantConfig or ROTATION) in page order."""
    from outlierlab.quant import scheme

    return [
        ("w8a8-tensor", scheme("w8a8-tensor")),
        ("w8a8-dynamic", scheme("w8a8-dynamic")),
        ("w8a8-outputs", scheme("w8a8-outputs")),
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
    """``w8a8-outputs`` first (its ranges serve ``w8a8-tensor``), ``smoothquant-search`` last (the
    fixed-α rows' statistics pass serves it, and their ranges serve the chosen α if it is 0.5 or
    0.8), the rest in page order."""
    return {"w8a8-outputs": 0, "smoothquant-search": 2}.get(label, 1)


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
    sensitivity: str | None = None,
    crosscheck: bool = False,
    share: float = 0.9,
    sensitivity_windows: int = SENSITIVITY_WINDOWS,
) -> dict[str, Any]:
    """The whole comparison (module docstring); ``progress(label)`` is called as each stage
    ends (the CLI's progress bar); ``points``: where the profile measures (monitor globs;
    ``auto``: the residual stream); ``labels``: these rows of :func:`schemes` (None:
    :data:`DEFAULT_SCHEMES`; see :func:`row_labels`); ``sensitivity``: a scheme name whose
    layer sensitivity (on the first ``sensitivity_windows`` windows), verified 16-bit
    recommendation (``share`` of its damage) and predictor table go on the page
    (:func:`add_sensitivity`); ``crosscheck``: our ``w8a8-dynamic``
    against torchao's real int8 path (:func:`add_crosscheck`).
    Returns the JSON-able result, ``headline`` included (:func:`headline`)."""
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
    res = {
        "fp_ppl": fp_ppl,
        "eval_windows": int(val_x.shape[0]),
        "seq_len": int(val_x.shape[1]),
        "stats_windows": int(sx.shape[0]),
        "calib_batches": len(calib),
        "calib_tokens": int(sum(b.numel() for b in calib)),
        "profile": prof,
        "schemes": [rows[label] for label, _ in order],
        "stage_seconds": stages,
    }
    if sensitivity is not None:
        t0 = time.perf_counter()
        add_sensitivity(res, model, sensitivity, calib, val_x, val_y, batch_size, share,
                        caches["model"], sensitivity_windows)  # fmt: skip
        stages["sensitivity"] = time.perf_counter() - t0
        stage_done("sensitivity")
    if crosscheck:
        t0 = time.perf_counter()
        add_crosscheck(res, model, calib, val_x, val_y, batch_size, caches["model"])
        stages["crosscheck"] = time.perf_counter() - t0
        stage_done("crosscheck")
    res["headline"] = headline(res)
    res["seconds"] = time.perf_counter() - t_start
    return res


def check_sensitivity_scheme(name: str, option: str = "--sensitivity") -> None:
    """A :class:`ConfigError` (naming ``option``) unless ``name`` is a scheme that quantises the
    model's own linears (any of :data:`outlierlab.quant.SCHEMES` without a rotation): what the
    layer sensitivity needs (``price --sensitivity``, ``quantize --predictors``)."""
    from outlierlab.quant import SCHEMES, scheme

    allowed = [n for n in SCHEMES if scheme(n).rotation is None]
    if name not in allowed:
        raise ConfigError(f"{option} {name!r} is not allowed; allowed: {', '.join(allowed)}")


def add_sensitivity(res: dict[str, Any], model: nn.Module, name: str, calib: list[torch.Tensor],
                    val_x: torch.Tensor, val_y: torch.Tensor, batch_size: int, share: float,
                    cache: Any = None, windows: int = SENSITIVITY_WINDOWS) -> None:  # fmt: skip
    """``res["sensitivity"]`` (:func:`outlierlab.quant.sensitivity.layer_sensitivity` of scheme
    ``name`` on the first ``windows`` evaluation windows: about 80 evaluations, so fewer
    windows than the profile's; its recommendation checked on every evaluation window) and
    ``res["predictors"]`` (:func:`outlierlab.quant.predictors.predictor_table`)."""
    from outlierlab.quant import scheme
    from outlierlab.quant.predictors import predictor_table
    from outlierlab.quant.sensitivity import layer_sensitivity

    check_sensitivity_scheme(name)
    row = next((r for r in res["schemes"] if r.get("label") == name and "quant_ppl" in r), None)
    n = max(1, min(windows, val_x.shape[0]))
    sens = layer_sensitivity(model, scheme(name), calib, val_x[:n], val_y[:n], batch_size,
                             share, cache, check=(val_x, val_y),
                             check_full=row is None)  # fmt: skip
    rec = sens["recommendation"]
    full_ppl = row["quant_ppl"] if row is not None else rec.pop("check_full_ppl")
    fp = res["fp_ppl"]
    rec["check_full_ppl"] = full_ppl
    rec["check_recovery"] = ((full_ppl - rec["check_ppl"]) / (full_ppl - fp)
                             if full_ppl > fp else None)  # fmt: skip
    res["sensitivity"] = sens
    res["predictors"] = predictor_table(sens, res["profile"])


def add_crosscheck(res: dict[str, Any], model: nn.Module, calib: list[torch.Tensor],
                   val_x: torch.Tensor, val_y: torch.Tensor, batch_size: int,
                   cache: Any = None) -> None:  # fmt: skip
    """``res["crosscheck"]``: :func:`outlierlab.quant.crosscheck.crosscheck` on the evaluation
    windows (our ``w8a8-dynamic`` row's perplexity when the page has it)."""
    from outlierlab.quant.crosscheck import crosscheck

    row = next((r for r in res["schemes"] if r.get("label") == "w8a8-dynamic"), None)
    ours = row.get("quant_ppl") if row else None
    res["crosscheck"] = crosscheck(model, val_x, val_y, batch_size, ours, cache, calib)


def _bits(r: dict[str, Any]) -> int:
    cfg = r.get("config") or {}
    return int(cfg.get("w_bits", 16)) + int(cfg.get("a_bits", 16))


def headline(res: dict[str, Any]) -> list[str]:
    """Two or three sentences a person reads first: the cheapest priced scheme within 1 % of FP
    (fewest weight + activation bits, then page order), what keeping the recommended layers in
    16-bit buys (with a sensitivity), and where the largest activation sits."""
    out = []
    rows = [r for r in res["schemes"] if "quant_ppl" in r]
    ok = sorted((r for r in rows if r["ppl_ratio"] <= 1.01), key=_bits)
    if ok:
        r = ok[0]
        out.append(f"The cheapest scheme priced here within 1 % of FP perplexity is {r['label']} "
                   f"({100 * (r['ppl_ratio'] - 1):+.1f} %, "
                   f"{_bits(r)} weight + activation bits).")  # fmt: skip
    elif rows:
        r = min(rows, key=lambda r: r["ppl_ratio"])
        out.append(f"No scheme priced here is within 1 % of FP perplexity; the closest is "
                   f"{r['label']} ({100 * (r['ppl_ratio'] - 1):+.1f} %).")  # fmt: skip
    sens = res.get("sensitivity")
    if sens:
        rec = sens["recommendation"]
        fp, full, kept = res["fp_ppl"], rec["check_full_ppl"], rec["check_ppl"]
        names = ", ".join(rec["keep_16bit"][:3]) + (" …" if len(rec["keep_16bit"]) > 3 else "")
        rv = rec["verified_recovery"]
        out.append(
            f"Keeping {len(rec['keep_16bit'])} of {sum(b['linears'] for b in sens['blocks'])} "
            f"linears in 16-bit ({names}) takes {sens['scheme']} from perplexity {full:.3f} "
            f"({100 * (full / fp - 1):+.1f} %) to {kept:.3f} ({100 * (kept / fp - 1):+.1f} %): "
            f"{_f(None if rv is None else 100 * rv, '.0f')} % of its damage (KL) recovered, "
            "verified by a real evaluation.")  # fmt: skip
    pts = [p for p in res["profile"]["points"] if p.get("top")]
    if pts:
        p = max(pts, key=lambda p: abs(p["top"][0]["value"]))
        top = p["top"][0]
        first = sum(1 for q in pts if q["top"][0]["token"] == 0)
        out.append(
            f"The largest activation, |x| = {abs(top['value']):.4g}, sits at {p['name']} "
            f"(token {top['token']} of window {top['window']}, channel {top['channel']}, "
            f"{_f(p['max_median_ratio'], '.0f')} × the median |x|); {first} of {len(pts)} "
            "points have their largest value on token 0.")  # fmt: skip
    return out


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


def sensitivity_tables(res: dict[str, Any]) -> list[tuple[str, tuple[list[str], list[list[str]]]]]:
    """The blocks' and the searched linears' damage (KL to FP, nats, and perplexity) when only
    they are quantised and when all but they are, and the recommendation ([] without one)."""
    sens = res.get("sensitivity")
    if not sens:
        return []
    head = ["", "linears", "alone: KL", "alone: perplexity", "all but: KL recovered",
            "all but: perplexity", "output error"]  # fmt: skip

    def row(r: dict[str, Any]) -> list[str]:
        return [r["name"], str(r["linears"]), _f(r["alone_kl"], ".4f"), _f(r["alone_ppl"], ".3f"),
                _f(r["without_kl"], ".4f"), _f(r["without_ppl"], ".3f"),
                _f(r.get("output_error"), ".4f")]  # fmt: skip

    rec = sens["recommendation"]
    fp = res["fp_ppl"]
    rec_rows = [
        ["all linears quantised", "—", _f(sens["full"]["kl"], ".4f"),
         _f(sens["full"]["ppl"], ".3f"), _f(rec["check_full_ppl"], ".3f"), "0 %"],
        [f"{len(rec['keep_16bit'])} kept in 16-bit: " + ", ".join(rec["keep_16bit"]),
         _f(None if rec["predicted_recovery"] is None else 100 * rec["predicted_recovery"], ".1f")
         + " %", _f(rec["verified_kl"], ".4f"), _f(rec["verified_ppl"], ".3f"),
         _f(rec["check_ppl"], ".3f"),
         _f(None if rec["verified_recovery"] is None else 100 * rec["verified_recovery"], ".1f")
         + " % (KL)" + ("" if rec.get("check_recovery") is None else
                        f", {100 * rec['check_recovery']:.1f} % (perplexity, all windows)")],
        ["none (FP)", "—", "0", "—", _f(fp, ".3f"), "—"],
    ]  # fmt: skip
    rec_head = ["16-bit set", "predicted recovery", f"KL ({sens['windows']} windows)",
                f"perplexity ({sens['windows']} windows)",
                f"perplexity ({rec.get('check_windows', '—')} windows)",
                "verified recovery"]  # fmt: skip
    blocks = sorted(sens["blocks"], key=lambda r: (r["name"] == "other", _block_index(r["name"])))
    return [
        (f"Which layers: sensitivity under {sens['scheme']} per block",
         (head, [row(r) for r in blocks])),
        ("The searched blocks' linears (largest recoverable damage first)",
         (head, [row(r) for r in sens["layers"]])),
        (f"What to keep in 16-bit (target {100 * sens['share']:.0f} % of the damage)",
         (rec_head, rec_rows)),
    ]  # fmt: skip


def _block_index(name: str) -> int:
    try:
        return int(name.split(".")[1])
    except (IndexError, ValueError):
        return 1 << 30


def predictor_rows(res: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    pred = res.get("predictors")
    if not pred:
        return [], []
    header = ["predictor (per block)", "ρ with damage alone",
              "ρ with damage recovered (searched blocks)",
              "blocks", "predicts when ρ is"]  # fmt: skip
    rows = [[r["predictor"], _f(r["rho_alone"], "+.2f"), _f(r["rho_without"], "+.2f"), str(r["n"]),
             "> 0" if r["sign"] > 0 else "< 0"] for r in pred["rows"]]  # fmt: skip
    return header, rows


def crosscheck_text(res: dict[str, Any]) -> str:
    c = res.get("crosscheck")
    if not c:
        return ""
    rd = 100 * c["relative_difference"]
    verdict = "agree within 1 %" if abs(rd) <= 1 else "differ by more than 1 %"
    return (f"Our fake-quantised w8a8-dynamic perplexity {c['ours_ppl']:.3f} against "
            f"{c['library']} {c['version']}'s real int8 path ({c['config']}: int8 per-token "
            f"activations, int8 per-channel weights, int32 accumulation) {c['torchao_ppl']:.3f} "
            f"on the same {c['windows']} windows: {rd:+.2f} % relative; they {verdict}. The "
            "grids differ by design: torchao's symmetric int8 is [−128, 127] with scale "
            "max|x| / 127.5, ours [−127, 127] with max|x| / 127; torchao accumulates int8 "
            "products in int32.")  # fmt: skip


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
    sens = res.get("sensitivity")
    if sens:
        blocks = sorted((b for b in sens["blocks"] if b["name"] != "other"),
                        key=lambda r: _block_index(r["name"]))  # fmt: skip
        fig, ax = plt.subplots(figsize=(11, 3.6))
        xs = [_block_index(b["name"]) for b in blocks]
        floor = 1e-6
        ax.bar([x - 0.2 for x in xs], [max(b["alone_kl"], floor) for b in blocks], 0.4,
               label="only this block quantised")
        some = [(x, b["without_kl"]) for x, b in zip(xs, blocks) if b["without_kl"] is not None]
        ax.bar([x + 0.2 for x, _ in some], [max(v, floor) for _, v in some], 0.4,
               label="damage recovered by keeping it in 16-bit (searched blocks)")
        ax.axhline(sens["full"]["kl"], color="k", lw=0.8, ls="--", label="all quantised")
        ax.set(yscale="log", xlabel="block", ylabel="KL to FP (nats / token)",
               title=f"layer sensitivity under {sens['scheme']}")  # fmt: skip
        ax.legend(fontsize=8)
        fig.tight_layout()
        figs.append(("price_sensitivity.png", f"Layer sensitivity under {sens['scheme']}"))
        save_figure(fig, out / figs[-1][0], dpi=110)
        plt.close(fig)
    return figs


def write_page(res: dict[str, Any], out: str | Path, title: str,
               figures: bool = True) -> dict[str, Path]:  # fmt: skip
    """Write ``price.md``, ``price.html``, ``price.json`` and (``figures``) the PNG figures into
    ``out``."""
    from outlierlab.experiments.tables import html_table, md_table
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
        *sensitivity_tables(res),
        ("Which measurement predicts the damage (Spearman ρ over blocks)", predictor_rows(res)),
        ("Where the massive activations sit (Sun et al. 2024)", massive_table(res)),
        ("Attention sinks", sink_table(res)),
    ]
    lead = " ".join(res.get("headline") or headline(res))
    md = [f"# {title}", "", f"**{lead}**", "", intro, ""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p><b>{html.escape(lead)}</b></p>",
            f"<p>{html.escape(intro)}</p>"]  # fmt: skip
    for name, (header, rows) in sections:
        if rows:
            md += [f"## {name}", "", md_table(header, rows), ""]
            body += [f"<h2>{html.escape(name)}</h2>", html_table(header, rows)]
    if text := crosscheck_text(res):
        md += ["## Cross-check against a real int8 implementation", "", text, ""]
        body += ["<h2>Cross-check against a real int8 implementation</h2>",
                 f"<p>{html.escape(text)}</p>"]  # fmt: skip
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


def compare_table(results: Sequence[dict[str, Any]],
                  names: Sequence[str]) -> tuple[list[str], list[list[str]]]:  # fmt: skip
    """Models side by side (one column each): FP perplexity, each scheme's increase, the
    residual stream's largest Kurt and |x|, the verified 16-bit recommendation, the best
    predictor and the real-int8 cross-check (— where a page lacks it)."""

    def scheme_cell(res: dict[str, Any], label: str) -> str:
        r = next((r for r in res["schemes"] if r.get("label") == label), None)
        if r is None:
            return "—"
        if "quant_ppl" not in r:
            return "n/a"
        return f"{r['quant_ppl']:.3f} ({100 * (r['ppl_ratio'] - 1):+.1f} %)"

    def top(res: dict[str, Any]) -> str:
        pts = [p for p in res["profile"]["points"] if p.get("top")]
        if not pts:
            return "—"
        p = max(pts, key=lambda p: abs(p["top"][0]["value"]))
        return f"{abs(p['top'][0]['value']):.4g} at {p['name']}, token {p['top'][0]['token']}"

    def rec(res: dict[str, Any]) -> str:
        s = res.get("sensitivity")
        if not s:
            return "—"
        r = s["recommendation"]
        v = r["verified_recovery"]
        return (f"{len(r['keep_16bit'])} linears under {s['scheme']}: {r['check_ppl']:.3f}, "
                f"{_f(None if v is None else 100 * v, '.0f')} % recovered")  # fmt: skip

    def best(res: dict[str, Any]) -> str:
        rows = [r for r in (res.get("predictors") or {}).get("rows", [])
                if r["rho_alone"] is not None]  # fmt: skip
        if not rows:
            return "—"
        r = max(rows, key=lambda r: r["sign"] * r["rho_alone"])
        return f"{r['predictor']} (ρ = {r['rho_alone']:+.2f})"

    def cross(res: dict[str, Any]) -> str:
        c = res.get("crosscheck")
        return "—" if not c else f"{100 * c['relative_difference']:+.2f} %"

    labels: list[str] = []
    for res in results:
        labels += [r["label"] for r in res["schemes"] if r["label"] not in labels]
    rows = [["FP perplexity", *[_f(r["fp_ppl"], ".3f") for r in results]]]
    rows += [[label, *[scheme_cell(r, label) for r in results]] for label in labels]
    kmax = [max((p["kurtosis"] for p in r["profile"]["points"] if math.isfinite(p["kurtosis"])),
                default=None) for r in results]  # fmt: skip
    rows += [
        ["largest residual Kurt", *[_f(k, ".1f") for k in kmax]],
        ["largest |x|", *[top(r) for r in results]],
        ["16-bit recommendation (verified)", *[rec(r) for r in results]],
        ["best damage predictor", *[best(r) for r in results]],
        ["torchao int8 vs ours", *[cross(r) for r in results]],
    ]  # fmt: skip
    return ["", *names], rows


def write_compare(results: Sequence[dict[str, Any]], names: Sequence[str],
                  out: str | Path) -> dict[str, Path]:  # fmt: skip
    """``compare.md``, ``compare.html`` and ``compare.json`` in ``out``: each model's headline,
    then :func:`compare_table` (each model's own page is in ``out/<name>/``)."""
    from outlierlab.experiments.tables import html_table, md_table
    from outlierlab.jsonable import write_json
    from outlierlab.safe_io import write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = compare_table(results, names)
    title = "Side by side: " + " vs ".join(names)
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for name, res in zip(names, results):
        lead = " ".join(res.get("headline") or [])
        md += [f"**{name}** ([page]({name}/price.md)): {lead}", ""]
        body.append(f"<p><b>{html.escape(name)}</b> (<a href='{html.escape(name)}/price.html'>"
                    f"page</a>): {html.escape(lead)}</p>")  # fmt: skip
    md += [md_table(header, rows), ""]
    body.append(html_table(header, rows))
    paths = {"md": out / "compare.md", "html": out / "compare.html", "json": out / "compare.json"}
    write_text(paths["md"], "\n".join(md))
    style = "body{font-family:sans-serif;max-width:1100px}td,th{padding:2px 8px;text-align:right}"
    head = f"<meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}</style>"
    write_text(paths["html"], f"<!doctype html><html><head>{head}</head><body>"
               f"{''.join(body)}</body></html>\n")  # fmt: skip
    write_json(paths["json"], {"models": list(names), "header": header, "rows": rows,
                               "headlines": [r.get("headline") for r in results]})  # fmt: skip
    return paths
