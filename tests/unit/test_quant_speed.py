"""The speed paths give what the plain paths give: the batched MSE range search picks the ranges
of a per-ratio loop, a CalibCache shares work without changing any range or weight, and the
one-pass perplexity + layer report equals the two separate passes."""

from __future__ import annotations

import math

import pytest
import torch

from outlierlab.model import GPT, GPTConfig
from outlierlab.quant import (
    CalibCache,
    calibrate,
    layer_report,
    perplexity,
    perplexity_and_report,
    quant_linears,
    scheme,
    wrap,
)
from outlierlab.quant.evaluate import logits_of
from outlierlab.quant.quantizers import (
    fake_quant,
    minmax_range,
    mse_range,
    mse_rows,
    quantize_dynamic,
    scale_zero_point,
)
from outlierlab.quant.wrap import act_quantizers, residual_quantizers


def _loop_mse_range(w, bits, symmetric, granularity):
    """The reference: one ratio at a time, error ‖w - q_r(w)‖² in the weight's own units."""
    rows, lo, hi = mse_rows(w, granularity)
    lo2, hi2 = lo.reshape(-1, 1), hi.reshape(-1, 1)
    ratios = torch.linspace(0.2, 1.0, 81, dtype=torch.float64).float()
    errs = []
    for r in ratios:
        s, z = scale_zero_point(lo2 * r, hi2 * r, bits, symmetric)
        errs.append((fake_quant(rows, s, z, bits, symmetric) - rows).pow(2).sum(-1))
    best = ratios[torch.stack(errs).argmin(0)]
    return lo * best.reshape(lo.shape), hi * best.reshape(hi.shape)


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [4, 8])
def test_batched_mse_search_picks_the_loops_ranges(granularity, symmetric, bits):
    g = torch.Generator().manual_seed(bits + 2 * symmetric)
    for shape in [(48, 80), (300, 577)]:  # 300 × 577 > MSE_SAMPLES: the subsampled path
        w = torch.randn(*shape, generator=g) * 0.05
        w[0, 3] = 2.0  # an outlier weight, so clipping pays
        lo, hi = mse_range(w, bits, symmetric, granularity)
        ref_lo, ref_hi = _loop_mse_range(w, bits, symmetric, granularity)
        assert torch.equal(lo, ref_lo) and torch.equal(hi, ref_hi)
        assert (hi <= minmax_range(w, granularity)[1]).all()  # clipped, never widened


def test_dynamic_per_token_matches_the_formula_bit_for_bit():
    x = torch.randn(4, 64, 96) * torch.rand(4, 64, 1) * 10
    x[0, 0, 5] = -2.7e4  # a massive activation on one token
    for bits in (4, 8):
        qmax = 2 ** (bits - 1) - 1
        scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp_min(1e-12)
        ref = (x / scale).round().clamp(-qmax, qmax) * scale
        assert torch.equal(quantize_dynamic(x, bits, True), ref)


def _gpt() -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig.preset("pre-ln", vocab_size=64, n_layer=2, d_model=32, n_head=2, d_mlp=64,
                           seq_len=16)  # fmt: skip
    return GPT(cfg).eval()


def _state(q):
    return {
        name: (m.weight_q, m.weight_noise, m.act.calib_lo, m.act.calib_hi, m.inv_smooth)
        for name, m in quant_linears(q).items()
    }


def _same(a, b) -> bool:
    return all(
        torch.equal(x, y) if torch.is_tensor(x) else x == y  # None == None
        for k in a
        for x, y in zip(a[k], b[k], strict=True)
    )


def test_calib_cache_shares_work_without_changing_the_result():
    model = _gpt()
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(2)]
    cache, calls = CalibCache(), []
    model.blocks[0].register_forward_hook(lambda m, a, o: calls.append(1))
    for name in ("w8a8-outputs", "w8a8-tensor"):  # the paper's pass serves w8a8-tensor too
        fresh, shared = wrap(model, scheme(name)), wrap(model, scheme(name))
        calibrate(fresh, scheme(name), batches, logits_of)
        n = len(calls)
        calibrate(shared, scheme(name), batches, logits_of, cache)
        passes = (len(calls) - n) // len(batches)
        assert passes == (1 if name == "w8a8-outputs" else 0)
        assert _same(_state(fresh), _state(shared))
        outputs = residual_quantizers(shared).values()  # w8a8-outputs's residual and norm outputs
        assert all(aq.calib_lo is not None for aq in outputs)
    for alpha in (0.5, 0.8):  # SmoothQuant's statistics pass once for both α
        cfg = scheme("w8a8-tensor", smooth_alpha=alpha)
        fresh, shared = wrap(model, cfg), wrap(model, cfg)
        calibrate(fresh, cfg, batches, logits_of)
        n = len(calls)
        calibrate(shared, cfg, batches, logits_of, cache)
        assert (len(calls) - n) // len(batches) == (2 if alpha == 0.5 else 1)
        assert _same(_state(fresh), _state(shared))
    assert all(aq.mode == "quant" for aq in act_quantizers(shared))


def test_one_pass_perplexity_and_report_equals_two_passes():
    model = _gpt()
    batches = [torch.randint(0, 64, (2, 16))]
    x, y = torch.randint(0, 64, (5, 16)), torch.randint(0, 64, (5, 16))
    for name in ("w8a8-tensor", "w8a8-dynamic"):
        q = wrap(model, scheme(name))
        calibrate(q, scheme(name), batches, logits_of)
        ppl, loss = perplexity(q, x, y, 2)
        rows = layer_report(q, x[:3], 2)
        ppl1, loss1, rows1 = perplexity_and_report(q, x, y, 2, stats_windows=3)
        assert math.isclose(loss1, loss, rel_tol=1e-6) and math.isclose(ppl1, ppl, rel_tol=1e-6)
        assert [r["name"] for r in rows1] == [r["name"] for r in rows]
        for a, b in zip(rows1, rows, strict=True):
            for key in ("act_sqnr_db", "weight_sqnr_db", "act_min", "act_max", "kurtosis"):
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6)
