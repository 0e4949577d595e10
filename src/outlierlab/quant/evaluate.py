"""Perplexity of a full-precision and a fake-quantised model on fixed validation windows, and
the per-layer damage report: activation and weight SQNR (dB), activation range and the layer
input's Kurt (science §1 Eq. 1 via :mod:`outlierlab.metrics`), so kurtosis and damage line up.

Perplexity = exp( Σ_tokens CE(logits, next token) / number of tokens ), all windows pooled.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from outlierlab.errors import DataError
from outlierlab.quant.calibrate import CalibCache, calibrate, stop_at_head
from outlierlab.quant.config import QuantConfig
from outlierlab.quant.quantizers import sqnr_db
from outlierlab.quant.wrap import (
    ActStats,
    quant_experts,
    quant_linears,
    residual_quantizers,
    wrap,
)
from outlierlab.stats import StatsAccumulator


def logits_of(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, vocab) of an outlierlab GPT (tensor), a tuple-returning model, or an HF
    causal LM (``.logits``)."""
    from outlierlab.structure import forward_tokens

    out = forward_tokens(model, idx)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple):
        return out[0]
    return out.logits


@torch.no_grad()
def perplexity(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8
) -> tuple[float, float]:
    """(perplexity, mean cross-entropy in nats) over all windows x, targets y (N, T)."""
    total, count = _ce_sum(model, x, y, batch_size)
    loss = total / count
    return math.exp(loss), loss


def _ce_sum(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int
) -> tuple[float, int]:
    """(Σ cross-entropy in nats, number of target tokens) over windows x, targets y."""
    total, count = 0.0, 0
    device = model_device(model)
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(device), y[i : i + batch_size].to(device)
        logits = logits_of(model, xb)
        total += float(
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), yb.reshape(-1), reduction="sum"
            )
        )
        count += yb.numel()
    return total, count


def calibration_batches(
    train_tokens: Any, seq_len: int, batch_size: int, n_batches: int, seed: int = 0
) -> list[torch.Tensor]:
    """``n_batches`` input batches (B, T) from the TRAIN split, drawn by the data module's
    :class:`~outlierlab.data.BatchSampler`; DataError if the split holds fewer tokens than
    ``n_batches · batch_size · seq_len`` (the batches could not be distinct)."""
    from outlierlab.data import BatchSampler

    need = n_batches * batch_size * seq_len + 1
    if len(train_tokens) < need:
        raise DataError(
            f"{n_batches} calibration batches of {batch_size}×{seq_len} need {need} training "
            f"tokens, the train split has {len(train_tokens)}; "
            "lower --calib-batches or --batch-size"
        )
    sampler = BatchSampler(train_tokens, seq_len, batch_size, seed)
    return [sampler.next()[0] for _ in range(n_batches)]


def model_device(model: nn.Module) -> torch.device:
    """The device of ``model``'s parameters (cpu for a model without any)."""
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _finite(v: float | None) -> float | None:
    return None if v is None or not math.isfinite(v) else v


@torch.no_grad()
def layer_report(
    qmodel: nn.Module, x: torch.Tensor, batch_size: int = 8, kurtosis: bool = True
) -> list[dict[str, Any]]:
    """Per quantised layer: activation SQNR and range over the windows x, weight SQNR, the
    calibrated static range, and Kurt of the layer's (unquantised) input (None without
    ``kurtosis``: its float64 sums are a large share of this pass)."""
    device = model_device(qmodel)
    with layer_stats(qmodel, kurtosis) as rows, stop_at_head(qmodel) as run:
        for i in range(0, x.shape[0], batch_size):  # the FP head has no quantiser to report
            run(logits_of, x[i : i + batch_size].to(device))
        return rows()


@contextmanager
def layer_stats(
    qmodel: nn.Module, kurtosis: bool = True
) -> Iterator[Callable[[], list[dict[str, Any]]]]:
    """Switch the per-layer statistics on for the forwards run inside; yields ``rows()``, the
    :func:`layer_report` rows of what those forwards saw."""
    layers = quant_linears(qmodel)
    resid = residual_quantizers(qmodel)
    experts = quant_experts(qmodel)
    for m in experts.values():
        m.act.stats = ActStats()
    for m in layers.values():
        if m.act is None:  # inputs arrive quantised (w8a8-paper): the output is the site,
            if m.out_act is not None:  # or (qkv, mlp.fc) a site after it
                m.out_act.stats, m.out_act.measure = ActStats(), kurtosis
            continue
        m.act.stats = ActStats()
        if kurtosis:  # Kurt of the layer input (science §1 Eq. 1); Kurt and MMR only: half the work
            m.kurt_acc = StatsAccumulator(m.in_features, extras=False)
    for aq in resid.values():
        aq.stats, aq.measure = ActStats(), kurtosis
    try:
        yield lambda: _report_rows(layers, resid, kurtosis) + _experts_rows(experts)
    finally:
        for m in experts.values():
            m.act.stats = None
        for m in layers.values():
            for aq in (m.act, m.out_act):
                if aq is not None:
                    aq.stats, aq.measure, aq.kurt_acc = None, False, None
            m.kurt_acc = None
        for aq in resid.values():
            aq.stats, aq.measure, aq.kurt_acc = None, False, None


def _measured(acc: Any) -> dict[str, float | None]:
    """Kurt and max/median (science §1 Eq. 1, 2) of what a StatsAccumulator saw (None: none)."""
    if acc is None:
        return {"kurtosis": None, "mmr": None}
    res = acc.result()
    return {"kurtosis": float(res["kurtosis"]), "mmr": float(res["mmr"])}


def _row(name: str, kind: str, act: Any, weight: Any = None, shape: list[int] | None = None,
         kurtosis: float | None = None, mmr: float | None = None) -> dict[str, Any]:  # fmt: skip
    """One layer-report row: ``act`` the activation quantiser (its ``stats`` and calibrated
    range), ``weight`` what holds ``weight_signal``/``weight_noise`` (None: no weight);
    ``kurtosis`` and ``mmr`` (max/median) of the tensor ``act`` quantises."""
    w_sqnr = None if weight is None else sqnr_db(weight.weight_signal, weight.weight_noise)
    return {
        "name": name,
        "kind": kind,
        **({} if shape is None else {"shape": shape}),
        "act_sqnr_db": _finite(sqnr_db(act.stats.signal, act.stats.noise)),
        "weight_sqnr_db": _finite(w_sqnr),
        "act_min": act.stats.lo,
        "act_max": act.stats.hi,
        "calib_min": act.calib_lo,
        "calib_max": act.calib_hi,
        "kurtosis": kurtosis,
        "mmr": mmr,
    }


def _experts_rows(experts: dict[str, Any]) -> list[dict[str, Any]]:
    return [_row(n, m.kind, m.act, m, shape=m.shape()) for n, m in experts.items()]


def _report_rows(
    layers: dict[str, Any], resid: dict[str, Any], kurtosis: bool
) -> list[dict[str, Any]]:
    rows = []
    for name, m in layers.items():
        shape = [m.out_features, m.in_features]
        if m.act is None and m.out_act is None:  # w8a8-paper's qkv and mlp.fc: weight only
            rows.append({"name": name, "kind": "linear-weight", "shape": shape,
                         "act_sqnr_db": None,
                         "weight_sqnr_db": _finite(sqnr_db(m.weight_signal, m.weight_noise)),
                         "act_min": None, "act_max": None, "calib_min": None, "calib_max": None,
                         "kurtosis": None, "mmr": None})
        elif m.act is None:  # w8a8-paper: the quantised tensor is the output
            rows.append(_row(f"{name}.output", "linear-output", m.out_act, m, shape=shape,
                             **_measured(m.out_act.kurt_acc)))
        else:
            rows.append(_row(name, "linear", m.act, m, shape=shape, **_measured(m.kurt_acc)))
    return rows + [
        _row(name, aq.kind, aq, aq if aq.has_weight else None, **_measured(aq.kurt_acc))
        for name, aq in resid.items()
    ]


@torch.no_grad()
def perplexity_and_report(
    qmodel: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 8,
    stats_windows: int = 16,
    kurtosis: bool = True,
) -> tuple[float, float, list[dict[str, Any]]]:
    """(perplexity, loss, :func:`layer_report` rows on the first ``stats_windows`` windows) from
    ONE pass over x: the statistics are on while the first windows are evaluated. Equal to
    :func:`perplexity` and :func:`layer_report` up to float summation order (the first windows
    are batched on their own)."""
    n = max(1, min(stats_windows, x.shape[0]))
    with layer_stats(qmodel, kurtosis) as rows:
        total, count = _ce_sum(qmodel, x[:n], y[:n], batch_size)
        report = rows()
    rest, rest_count = _ce_sum(qmodel, x[n:], y[n:], batch_size)
    loss = (total + rest) / (count + rest_count)
    return math.exp(loss), loss, report


@torch.no_grad()
def residual_kurtosis(model: nn.Module, x: torch.Tensor, batch_size: int = 8,
                      points: str | Sequence[str] = "auto") -> dict[str, Any]:  # fmt: skip
    """Kurt of the full-precision model at the monitor's ``points`` (``auto``: the residual
    stream) on x: ``{"points": {name: kurt}, "kurtosis_mean": ..., "kurtosis_max": ...}``."""
    from outlierlab.monitor import OutlierMonitor

    device = model_device(model)
    with OutlierMonitor(model, points=points) as mon, stop_at_head(model) as run:
        for i in range(0, x.shape[0], batch_size):
            run(logits_of, x[i : i + batch_size].to(device))
        results = mon.results()
        summary = mon.summary()
    return {
        "points": {k: float(v["kurtosis"]) for k, v in results.items()},
        "mmr_points": {k: float(v["mmr"]) for k, v in results.items()},
        "kurtosis_mean": float(summary["kurtosis_mean"]),
        "kurtosis_max": float(summary["kurtosis_max"]),
    }


def prepared(
    model: nn.Module, cfg: QuantConfig, cache: CalibCache | None = None
) -> tuple[nn.Module, CalibCache | None]:
    """The model a scheme quantises and the cache that goes with it: ``model`` itself, or for
    ``rotation="quarot"`` its rotated copy with the online Hadamard on every down_proj
    (:func:`outlierlab.quant.rotate.rotate`), built once per cache."""
    if cfg.rotation is None:
        return model, cache
    from outlierlab.quant.rotate import rotate

    if cache is None:
        return rotate(model, online_hadamard=True), None
    if cfg.rotation not in cache.derived:
        cache.derived[cfg.rotation] = (rotate(model, online_hadamard=True), CalibCache())
    return cache.derived[cfg.rotation]


def quantize_and_evaluate(
    model: nn.Module,
    cfg: QuantConfig,
    calib: Sequence[torch.Tensor],
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    batch_size: int = 8,
    stats_windows: int = 16,
    fp: dict[str, float] | None = None,
    resid: dict[str, Any] | None = None,
    layer_kurtosis: bool = True,
    cache: CalibCache | None = None,
    points: str | Sequence[str] = "auto",
) -> dict[str, Any]:
    """The whole pipeline on ``model`` (never modified): FP perplexity, a wrapped copy calibrated
    on ``calib`` (train batches), quantised perplexity on the same windows, the per-layer report
    on the first ``stats_windows`` windows, and the FP residual-stream Kurt.

    ``fp`` (``{"ppl", "loss", "seconds"}``) reuses an FP evaluation of the same windows, ``resid``
    a :func:`residual_kurtosis` result on the same stats windows; ``layer_kurtosis=False`` leaves
    the linear inputs' Kurt out of the layer report; ``cache`` (:class:`CalibCache`) shares
    calibration work with other schemes on the same model and ``calib`` batches; ``points``
    (monitor globs) where the residual Kurt is measured.
    The quantised perplexity and the layer report come from one pass
    (:func:`perplexity_and_report`); ``quant_eval_s`` times that pass.
    Returns the JSON-able result (top-level ``fp_ppl``, ``quant_ppl``, ``scheme``, ``config``,
    ``layers``).
    """
    if val_x.shape[0] == 0:
        raise DataError("no validation windows to evaluate")
    model.eval()
    if fp is None:
        t0 = time.perf_counter()
        fp_ppl, fp_loss = perplexity(model, val_x, val_y, batch_size)
        fp = {"ppl": fp_ppl, "loss": fp_loss, "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    target, cache = prepared(model, cfg, cache)
    qmodel = wrap(target, cfg)
    chosen = calibrate(qmodel, cfg, calib, logits_of, cache)
    calib_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    q_ppl, q_loss, layers = perplexity_and_report(
        qmodel, val_x, val_y, batch_size, stats_windows, layer_kurtosis
    )
    q_s = time.perf_counter() - t0
    sx = val_x[: max(1, min(stats_windows, val_x.shape[0]))]
    resid = resid or residual_kurtosis(model, sx, batch_size, points)
    for row in layers:  # the residual stream's Kurt as the FP model has it, where measured
        if row["kind"] == "residual" and row["name"] in resid["points"]:
            row["kurtosis"] = resid["points"][row["name"]]
            row["mmr"] = resid.get("mmr_points", {}).get(row["name"], row.get("mmr"))
    return {
        "scheme": cfg.name,
        "config": cfg.to_dict(),
        "fp_ppl": fp["ppl"],
        "quant_ppl": q_ppl,
        "ppl_increase": q_ppl - fp["ppl"],
        "ppl_ratio": q_ppl / fp["ppl"],
        "fp_loss": fp["loss"],
        "quant_loss": q_loss,
        "eval_windows": int(val_x.shape[0]),
        "seq_len": int(val_x.shape[1]),
        "eval_tokens": int(val_y.numel()),
        "calib_batches": len(calib),
        "calib_tokens": int(sum(b.numel() for b in calib)),
        "stats_windows": int(sx.shape[0]),
        "fp_eval_s": fp["seconds"],
        "quant_eval_s": q_s,
        "eval_time_ratio": q_s / fp["seconds"] if fp["seconds"] > 0 else None,
        "calib_s": calib_s,
        **({"smooth_alpha": chosen["smooth_alpha"]} if chosen["smooth_alpha"] is not None else {}),
        **({"smooth_search_ce": {str(a): v for a, v in chosen["smooth_search_ce"].items()}}
           if "smooth_search_ce" in chosen else {}),
        "kurtosis_mean": resid["kurtosis_mean"],
        "kurtosis_max": resid["kurtosis_max"],
        "residual_kurtosis": resid["points"],
        "layers": layers,
    }
