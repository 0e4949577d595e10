"""Calibration: SmoothQuant scales and static activation ranges from TRAINING batches.

The validation windows used for perplexity are never seen here (SPEC §4); callers pass batches
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
    - ``ranges``: static activation ranges by quantiser name, per (weight config, activation
      config): the observing pass runs with every activation quantiser the identity, so a
      quantiser's range depends on nothing else (``w8a8-paper``'s pass gives ``w8a8-tensor``'s).
    """

    weights: dict[tuple, tuple[torch.Tensor, float, float]] = field(default_factory=dict)
    xmax: dict[str, torch.Tensor] | None = None
    ranges: dict[tuple, dict[str, tuple[float, float]]] = field(default_factory=dict)


def _weight_key(cfg: QuantConfig) -> tuple:
    return (cfg.w_bits, cfg.w_symmetric, cfg.w_granularity, cfg.w_range)


def _range_key(cfg: QuantConfig) -> tuple:
    act = (cfg.a_bits, cfg.a_symmetric, cfg.a_range, cfg.a_percentile)
    return (*_weight_key(cfg), cfg.smooth_alpha, *act)


def _run_all(qmodel: nn.Module, batches: Sequence[torch.Tensor], forward: Forward) -> None:
    with stop_at_head(qmodel) as run:
        for x in batches:
            run(forward, x)


def _smooth_xmax(
    layers: dict[str, QuantLinear], qmodel: nn.Module, batches: Sequence[torch.Tensor],
    forward: Forward, cache: CalibCache | None,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """max|X_j| per input channel of every linear, from one full-precision pass (or the cache)."""
    if cache is not None and cache.xmax is not None and set(layers) <= set(cache.xmax):
        return cache.xmax
    for m in layers.values():
        m.smooth_observe = True
    try:
        _run_all(qmodel, batches, forward)
    finally:
        for m in layers.values():
            m.smooth_observe = False
    # a linear no calibration batch reached (a decoder's cross-attention without an encoder, a
    # vision tower on text) has no statistics: it stays unsmoothed (None)
    xmax = {name: (m.take_xmax() if m.observed else None) for name, m in layers.items()}
    if cache is not None:
        cache.xmax = xmax
    return xmax


def _quantize_weights(
    layers: dict[str, QuantLinear], cfg: QuantConfig, cache: CalibCache | None
) -> None:
    shared = cache is not None and cfg.smooth_alpha is None
    for name, m in layers.items():
        key = (name, *_weight_key(cfg))
        if shared and key in cache.weights:
            m.weight_q, m.weight_signal, m.weight_noise = cache.weights[key]
            continue
        m.quantize_weight()
        if shared:
            cache.weights[key] = (m.weight_q, m.weight_signal, m.weight_noise)


def _static_ranges(
    qmodel: nn.Module, cfg: QuantConfig, batches: Sequence[torch.Tensor], forward: Forward,
    cache: CalibCache | None,
) -> None:  # fmt: skip
    """Fix every static activation quantiser's range: one observing pass, or the cache."""
    static = {n: m for n, m in qmodel.named_modules() if isinstance(m, ActQuant)}
    static = {n: aq for n, aq in static.items() if aq.granularity == "tensor"}
    if not static:
        return
    known = None if cache is None else cache.ranges.get(_range_key(cfg))
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
        cache.ranges[_range_key(cfg)] = {n: (aq.calib_lo, aq.calib_hi) for n, aq in static.items()}


@torch.no_grad()
def calibrate(
    qmodel: nn.Module,
    cfg: QuantConfig,
    batches: Sequence[torch.Tensor],
    forward: Forward,
    cache: CalibCache | None = None,
) -> None:
    """Calibrate a wrapped model (:func:`outlierlab.quant.wrap.wrap`) in place on ``batches``
    (token id tensors (B, T) from the train split) and switch quantisation on; ``cache`` shares
    weights, SmoothQuant statistics and static ranges with earlier calls on the same model and
    batches (:class:`CalibCache`; results identical to computing them again)."""
    layers = quant_linears(qmodel)
    static = [aq for aq in act_quantizers(qmodel) if aq.granularity == "tensor"]
    if (static or cfg.smooth_alpha is not None) and len(batches) == 0:
        raise ConfigError("calibration needs at least one training batch (calib batches ≥ 1)")
    set_act_mode(qmodel, "off")
    if cfg.smooth_alpha is not None:
        xmax = _smooth_xmax(layers, qmodel, batches, forward, cache)
        for name, m in layers.items():
            if xmax[name] is not None:
                m.set_smoothing(float(cfg.smooth_alpha), xmax[name])
    _quantize_weights(layers, cfg, cache)
    for experts in quant_experts(qmodel).values():
        experts.quantize_weight()
    _static_ranges(qmodel, cfg, batches, forward, cache)
    set_act_mode(qmodel, "quant")
