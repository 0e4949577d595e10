"""Calibration: SmoothQuant scales and static activation ranges from TRAINING batches.

The validation windows used for perplexity are never seen here (SPEC §4); callers pass batches
drawn from the train split (:func:`outlierlab.quant.evaluate.calibration_batches`).

Order, all under ``torch.no_grad``:
1. with ``smooth_alpha``: one pass recording max|X_j| per input channel of every linear, then
   s_j = max|X_j|^α / max|W_j|^(1-α) folded into the layer (x / s, W · s);
2. every weight fake-quantised once and cached;
3. with static (per-tensor) activations: one pass with weights quantised and activation
   quantisers observing (identity), then ranges fixed (min-max over all batches, or a percentile);
4. every activation quantiser switched on.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

import torch
from torch import nn

from outlierlab.errors import ConfigError
from outlierlab.quant.config import QuantConfig
from outlierlab.quant.wrap import act_quantizers, head_names, quant_linears, set_act_mode

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


@torch.no_grad()
def calibrate(
    qmodel: nn.Module, cfg: QuantConfig, batches: Sequence[torch.Tensor], forward: Forward
) -> None:
    """Calibrate a wrapped model (:func:`outlierlab.quant.wrap.wrap`) in place on ``batches``
    (token id tensors (B, T) from the train split) and switch quantisation on."""
    layers = quant_linears(qmodel)
    static = [aq for aq in act_quantizers(qmodel) if aq.granularity == "tensor"]
    if (static or cfg.smooth_alpha is not None) and len(batches) == 0:
        raise ConfigError("calibration needs at least one training batch (calib batches ≥ 1)")
    set_act_mode(qmodel, "off")
    if cfg.smooth_alpha is not None:
        for m in layers.values():
            m.smooth_observe = True
        try:
            with stop_at_head(qmodel) as run:
                for x in batches:
                    run(forward, x)
        finally:
            for m in layers.values():
                m.smooth_observe = False
        for m in layers.values():
            m.set_smoothing(float(cfg.smooth_alpha))
    for m in layers.values():
        m.quantize_weight()
    if static:
        for aq in static:
            aq.mode = "observe"
        with stop_at_head(qmodel) as run:
            for x in batches:
                run(forward, x)
        for aq in static:
            aq.finalize()
    set_act_mode(qmodel, "quant")
