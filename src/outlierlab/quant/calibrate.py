"""Calibration: SmoothQuant scales and static activation ranges from TRAINING batches.

The validation windows used for perplexity are never seen here (science §4); callers pass batches
drawn from the train split (:func:`outlierlab.quant.evaluate.calibration_batches`).

Order, all under ``torch.no_grad``:
1. with ``smooth_alpha``: one pass recording max|X_j| per input channel of every linear, then
   s_j = max|X_j|^α / max|W_j|^(1-α) folded into the layer (x / s, W · s);
2. every weight fake-quantised once and cached;
3. with static (per-tensor) activations: one pass with weights quantised and activation
   quantisers observing (identity), then ranges fixed (min-max over all batches, or a percentile);
   a running min-max is two Python floats per quantiser, updated once per call.

A :class:`CalibCache` shares steps 1–3 between schemes on the same model and batches.
4. every activation quantiser switched on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from outlierlab.errors import ConfigError
from outlierlab.quant.config import QuantConfig
from outlierlab.quant.wrap import (
    ActQuant,
    QuantLinear,
    act_quantizers,
    head_names,
    quant_experts,
    quant_linears,
    set_act_mode,
)

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]


class _HeadReached(Exception):
    """Raised by :func:`stop_at_head`'s hook: the rest of the forward is not needed."""


def _raise_head_reached(module: nn.Module, args: object) -> None:
    raise _HeadReached


@contextmanager
def stop_at_head(model: nn.Module) -> Iterator[Callable[[Forward, torch.Tensor], None]]:
    """A runner ``run(forward, x)`` that stops each forward at the input of the model's
    full-precision LM head (:func:`~outlierlab.quant.wrap.head_names`; a quantised head is a
    ``QuantLinear`` and still runs). Calibration and statistics passes need no logits, and the
    head is a large share of a small LM's forward (SmolLM2-135M: 576 × 49152 of 135 M weights).
    Forward hooks registered with ``always_call`` (the monitor's) still see the stopped call."""
    hooks = [
        model.get_submodule(n).register_forward_pre_hook(_raise_head_reached)
        for n in sorted(head_names(model))
    ]

    def run(forward: Forward, x: torch.Tensor) -> None:
        with suppress(_HeadReached):
            forward(model, x)

    try:
        yield run
    finally:
        for h in hooks:
            h.remove()


@dataclass
class CalibCache:
    """Work shared by schemes that quantise the SAME model on the SAME calibration batches (the
    caller's promise; ``outlierlab price`` keeps one per model):

    - ``weights``: Q(W), signal and noise power by (linear, weight config) — unsmoothed only;
    - ``xmax``: SmoothQuant's max|X_j| per linear, observed on the full-precision model;
    - ``xtx``: GPTQ's Σ x xᵀ per linear, observed on the full-precision model;
    - ``ranges``: static activation ranges by quantiser name, per (weight config, activation
      config): the observing pass runs with every activation quantiser the identity, so a
      quantiser's range depends on nothing else (``w8a8-outputs``'s pass gives ``w8a8-tensor``'s;
      a ``running`` range, which quantises while it calibrates, is keyed by its own scheme);
    - ``derived``: rotated copies of the model (``rotation``) with a cache of their own.
    """

    weights: dict[tuple, tuple[torch.Tensor, float, float]] = field(default_factory=dict)
    xmax: dict[str, torch.Tensor] | None = None
    xtx: dict[str, torch.Tensor | None] | None = None
    ranges: dict[tuple, dict[str, tuple[float, float]]] = field(default_factory=dict)
    derived: dict[str, tuple[nn.Module, CalibCache]] = field(default_factory=dict)


def _weight_key(cfg: QuantConfig) -> tuple:
    return (cfg.w_bits, cfg.w_symmetric, cfg.w_granularity, cfg.w_range, cfg.w_format,
            cfg.w_group_size, cfg.w_method)  # fmt: skip


def _range_key(cfg: QuantConfig, alpha: float | None) -> tuple:
    act = (cfg.a_bits, cfg.a_symmetric, cfg.a_range, cfg.a_percentile, cfg.a_format)
    return (*_weight_key(cfg), alpha, *act)


def _run_all(qmodel: nn.Module, batches: Sequence[torch.Tensor], forward: Forward) -> None:
    with stop_at_head(qmodel) as run:
        for x in batches:
            run(forward, x)


def _fp_stats(
    layers: dict[str, QuantLinear], qmodel: nn.Module, batches: Sequence[torch.Tensor],
    forward: Forward, cache: CalibCache | None, kind: str,
) -> dict[str, torch.Tensor | None]:  # fmt: skip
    """Per linear, from one full-precision pass (or the cache): ``xmax``, max|X_j| per input
    channel (SmoothQuant), or ``xtx``, Σ x xᵀ over the calibration tokens (GPTQ's H ∝ XᵀX).
    A linear no calibration batch reached (a decoder's cross-attention without an encoder, a
    vision tower on text) has none (None): it stays unsmoothed / is rounded to nearest."""
    known = None if cache is None else getattr(cache, kind)
    if known is not None and set(layers) <= set(known):
        return known
    flag = "smooth_observe" if kind == "xmax" else "xtx_observe"
    for m in layers.values():
        setattr(m, flag, True)
    try:
        _run_all(qmodel, batches, forward)
    finally:
        for m in layers.values():
            setattr(m, flag, False)
    if kind == "xmax":
        out = {name: (m.take_xmax() if m.observed else None) for name, m in layers.items()}
    else:
        out = {name: m.take_xtx() for name, m in layers.items()}
    if cache is not None:
        setattr(cache, kind, out)
    return out


def _quantize_weights(
    layers: dict[str, QuantLinear], cfg: QuantConfig, cache: CalibCache | None,
    xtx: dict[str, torch.Tensor | None] | None = None, smoothed: bool = False,
) -> None:  # fmt: skip
    shared = cache is not None and not smoothed
    done = set()
    if cfg.w_method == "gptq" and xtx is not None:
        todo = {n: m for n, m in layers.items()
                if not (shared and (n, *_weight_key(cfg)) in cache.weights)}  # fmt: skip
        done = _gptq_shared_inputs(todo, cfg, xtx)
    for name, m in layers.items():
        key = (name, *_weight_key(cfg))
        if name in done:
            pass
        elif shared and key in cache.weights:
            m.weight_q, m.weight_signal, m.weight_noise = cache.weights[key]
            continue
        else:
            h = None if xtx is None else xtx.get(name)
            if cfg.w_method == "gptq" and h is None:  # never reached by calibration: RTN
                m.cfg = cfg.replace(w_method="rtn")
            elif h is not None and m.inv_smooth is not None:  # inputs x / s: H → S⁻¹ H S⁻¹
                inv = m.inv_smooth.float()
                h = h * inv[:, None] * inv[None, :]
            m.quantize_weight(h)
            m.cfg = cfg
        if shared:
            cache.weights[key] = (m.weight_q, m.weight_signal, m.weight_noise)


def _gptq_shared_inputs(
    layers: dict[str, QuantLinear], cfg: QuantConfig, xtx: dict[str, torch.Tensor | None]
) -> set[str]:
    """GPTQ once for consecutive unsmoothed linears reading the same input (q/k/v, gate/up: equal
    XᵀX): their weights stacked by rows, which GPTQ treats independently given H (one column
    loop instead of several). Returns the names quantised here."""
    from outlierlab.quant.gptq import gptq_quantize

    runs: list[list[str]] = []
    for name, m in layers.items():
        h = xtx.get(name)
        if h is None or m.inv_smooth is not None:
            continue
        prev = runs[-1][-1] if runs else None
        if prev is not None and xtx[prev].shape == h.shape and torch.equal(xtx[prev], h) \
                and list(layers).index(prev) == list(layers).index(name) - 1:  # fmt: skip
            runs[-1].append(name)
        else:
            runs.append([name])
    done = set()
    for run in (r for r in runs if len(r) > 1):
        ws = [layers[n].weight.detach().float() for n in run]
        wq = gptq_quantize(torch.cat(ws), xtx[run[0]], cfg.w_bits, cfg.w_symmetric,
                           cfg.w_group_size)  # fmt: skip
        for n, part in zip(run, wq.split([w.shape[0] for w in ws]), strict=True):
            layers[n].set_weight_q(part)
            done.add(n)
    return done


def _static_ranges(
    qmodel: nn.Module, cfg: QuantConfig, batches: Sequence[torch.Tensor], forward: Forward,
    cache: CalibCache | None, alpha: float | None = None,
) -> None:  # fmt: skip
    """Fix every static activation quantiser's range: one observing pass, or the cache."""
    static = {n: m for n, m in qmodel.named_modules() if isinstance(m, ActQuant)}
    static = {n: aq for n, aq in static.items() if aq.granularity == "tensor"}
    if not static:
        return
    known = None if cache is None else cache.ranges.get(_range_key(cfg, alpha))
    if known is not None and set(static) <= set(known):
        for n, aq in static.items():
            aq.calib_lo, aq.calib_hi = known[n]
    else:
        for aq in static.values():
            aq.mode = "observe"
        _run_all(qmodel, batches, forward)
    for aq in static.values():
        aq.finalize()
    if cache is not None and known is None:
        ranges = {n: (aq.calib_lo, aq.calib_hi) for n, aq in static.items()}
        cache.ranges[_range_key(cfg, alpha)] = ranges


def _calib_ce(qmodel: nn.Module, batches: Sequence[torch.Tensor], forward: Forward) -> float:
    """Mean next-token cross-entropy (nats) of ``qmodel`` on the calibration batches."""
    total, count = 0.0, 0
    for x in batches:
        logits = forward(qmodel, x)[:, :-1]
        y = x[:, 1:].to(logits.device)
        total += float(torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return total / max(count, 1)


def _search_alpha(
    qmodel: nn.Module, layers: dict[str, QuantLinear], cfg: QuantConfig,
    batches: Sequence[torch.Tensor], forward: Forward, cache: CalibCache,
    xmax: dict[str, torch.Tensor | None],
) -> tuple[float, dict[float, float]]:  # fmt: skip
    """SmoothQuant's α per model: for every α of ``SMOOTH_GRID`` smooth, quantise weights and
    measure the cross-entropy on the CALIBRATION batches (never the validation windows); the
    lowest wins (the smaller α on ties). One pass per α: static quantisers take each batch's own
    min-max range meanwhile (per tensor, a proxy of the calibration range over all batches, which
    only the chosen α then gets). The model is restored."""
    from outlierlab.quant.config import SMOOTH_GRID

    saved = {n: m.weight.data.clone() for n, m in layers.items()}
    ce: dict[float, float] = {}
    for alpha in SMOOTH_GRID:
        _smooth(layers, xmax, alpha)
        _quantize_weights(layers, cfg, cache, smoothed=True)
        for aq in act_quantizers(qmodel):
            aq.uncalibrated = aq.granularity == "tensor"  # per-batch range (ActQuant.forward)
        set_act_mode(qmodel, "quant")
        ce[alpha] = _calib_ce(qmodel, batches, forward)
        set_act_mode(qmodel, "off")
        for n, m in layers.items():
            m.weight.data.copy_(saved[n])
            m.inv_smooth = m.weight_q = None
        for aq in act_quantizers(qmodel):
            aq.reset()
    return min(ce, key=lambda a: (ce[a], a)), ce


def _smooth(
    layers: dict[str, QuantLinear], xmax: dict[str, torch.Tensor | None], alpha: float
) -> None:
    """SmoothQuant with α on every linear that calibration reached (others unsmoothed)."""
    for name, m in layers.items():
        if xmax[name] is not None:
            m.set_smoothing(float(alpha), xmax[name])


@torch.no_grad()
def calibrate(
    qmodel: nn.Module,
    cfg: QuantConfig,
    batches: Sequence[torch.Tensor],
    forward: Forward,
    cache: CalibCache | None = None,
) -> dict[str, Any]:
    """Calibrate a wrapped model (:func:`outlierlab.quant.wrap.wrap`) in place on ``batches``
    (token id tensors (B, T) from the train split) and switch quantisation on; ``cache`` shares
    weights, SmoothQuant / GPTQ statistics and static ranges with earlier calls on the same model
    and batches (:class:`CalibCache`; results identical to computing them again).

    Returns what calibration chose: ``{"smooth_alpha": α or None}`` and, with
    ``smooth_search``, ``"smooth_search_ce": {α: calibration cross-entropy}``."""
    layers = quant_linears(qmodel)
    weight_only = cfg.a_format == "none"
    static = [aq for aq in act_quantizers(qmodel) if aq.granularity == "tensor"]
    needs = (static and not weight_only) or cfg.smooth_alpha is not None or cfg.smooth_search
    if (needs or cfg.w_method == "gptq") and len(batches) == 0:
        raise ConfigError("calibration needs at least one training batch (calib batches ≥ 1)")
    set_act_mode(qmodel, "off")
    info: dict[str, Any] = {"smooth_alpha": cfg.smooth_alpha}
    alpha = cfg.smooth_alpha
    if alpha is not None or cfg.smooth_search:
        xmax = _fp_stats(layers, qmodel, batches, forward, cache, "xmax")
        if cfg.smooth_search:
            cache = CalibCache() if cache is None else cache  # ranges of the chosen α reused
            alpha, ce = _search_alpha(qmodel, layers, cfg, batches, forward, cache, xmax)
            info.update(smooth_alpha=alpha, smooth_search_ce=ce)
        _smooth(layers, xmax, alpha)
    xtx = _fp_stats(layers, qmodel, batches, forward, cache, "xtx") \
        if cfg.w_method == "gptq" else None  # fmt: skip
    _quantize_weights(layers, cfg, cache, xtx, smoothed=alpha is not None)
    for experts in quant_experts(qmodel).values():
        experts.quantize_weight()
    if not weight_only:
        _static_ranges(qmodel, cfg, batches, forward, cache, alpha)
    set_act_mode(qmodel, "off" if weight_only else "quant")
    return info
