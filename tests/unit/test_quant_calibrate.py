"""Calibration passes stop at the LM head (no logits needed) and give the same ranges."""

from __future__ import annotations

import torch

from outlierlab.model import GPT, GPTConfig
from outlierlab.quant import calibrate, quant_linears, scheme, wrap
from outlierlab.quant.calibrate import stop_at_head
from outlierlab.quant.evaluate import logits_of
from outlierlab.quant.wrap import act_quantizers


def _gpt() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig.preset("pre-ln", vocab_size=64, n_layer=2, d_model=32, n_head=2, d_mlp=64,
                           seq_len=16)  # fmt: skip
    return GPT(cfg).eval()


def test_calibration_skips_the_head_and_matches_full_forwards():
    model, cfg = _gpt(), scheme("w8a8-tensor", smooth_alpha=0.5)
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
    calls = []
    q = wrap(model, cfg)
    q.lm_head.register_forward_hook(lambda m, a, o: calls.append(1))
    calibrate(q, cfg, batches, logits_of)
    assert calls == []  # neither the smoothing nor the range pass ran the FP head
    # reference: the same passes by hand with full forwards (logits computed)
    ref = wrap(model, cfg)
    layers = quant_linears(ref)
    for m in layers.values():
        m.smooth_observe = True
    for x in batches:
        logits_of(ref, x)
    for m in layers.values():
        m.smooth_observe = False
        m.set_smoothing(0.5)
        m.quantize_weight()
    for aq in act_quantizers(ref):
        aq.mode = "observe"
    for x in batches:
        logits_of(ref, x)
    for name, m in quant_linears(q).items():
        r = layers[name]
        assert (m.act.calib_lo, m.act.calib_hi) == (r.act.calib_lo, r.act.calib_hi)


def test_stop_at_head_removes_its_hooks_and_quantised_head_still_runs():
    model = _gpt()
    with stop_at_head(model) as run:
        run(logits_of, torch.randint(0, 64, (1, 8)))
    assert logits_of(model, torch.randint(0, 64, (1, 8))).shape == (1, 8, 64)
    q = wrap(model, scheme("w8a8-tensor", quantize_head=True))
    calibrate(q, q.lm_head.cfg, [torch.randint(0, 64, (2, 16))], logits_of)
    assert q.lm_head.act.calib_lo is not None  # the quantised head observed its input
