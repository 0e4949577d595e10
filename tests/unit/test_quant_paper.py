"""`w8a8-paper` as Bondarenko et al. (2023) run it (outlier-free-transformers): each quantiser
against a float64 numpy transcription of their code, the sites counted on tiny GPTs, and old
`w8a8-paper` results filed under `w8a8-outputs`."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from outlierlab.errors import ConfigError
from outlierlab.model.config import PRESETS, GPTConfig
from outlierlab.model.gpt import GPT
from outlierlab.quant import calibrate, logits_of, scheme, wrap
from outlierlab.quant.paper import ATTENTION_SITES
from outlierlab.quant.quantizers import exact_percentile_range, grid_quantize_weight
from outlierlab.quant.wrap import ActQuant, QuantLinear
from outlierlab.run_folder import RunFolder

# -- their quantisers, transcribed in float64 numpy -----------------------------------------------


def _their_symmetric(x: np.ndarray, x_min: float, x_max: float, bits: int = 8) -> np.ndarray:
    """SymmetricUniformQuantizer.set_quant_range + forward (quantizers/uniform_quantizers.py)."""
    x_min, x_max = min(x_min, 0.0), max(x_max, 1e-8)
    signed = x_min < 0
    int_min = -(2.0 ** (bits - 1)) if signed else 0.0
    int_max = 2.0 ** (bits - signed) - 1
    delta = max(abs(x_min), x_max) / int_max
    scale = max(delta, 1e-8)
    return scale * np.clip(np.round(x / scale), int_min, int_max)


def _their_asymmetric(x: np.ndarray, x_min: float, x_max: float, bits: int = 8) -> np.ndarray:
    """AsymmetricUniformQuantizer.set_quant_range + forward."""
    x_min, x_max = min(x_min, 0.0), max(x_max, 1e-8)
    int_max = 2.0**bits - 1
    delta = (x_max - x_min) / int_max
    zero = np.clip(np.round(-x_min / delta), 0, int_max)
    scale = max(delta, 1e-8)
    return scale * (np.clip(np.round(x / scale) + zero, 0, int_max) - zero)


def _their_mse_weight(w: np.ndarray, bits: int = 8) -> np.ndarray:
    """MSE_Estimator (grid, 100 candidates, range_margin 0.5) then the symmetric quantiser."""
    one_sided = w.min() >= 0
    step = (max(abs(w.min()), w.max()) + 0.5) / 100
    loss = np.full(101, np.inf)
    for k in range(1, 101):
        neg = 0.0 if one_sided else -step * k
        loss[k] = np.sum((w - _their_symmetric(w, neg, step * k, bits)) ** 2)
    k = int(loss.argmin())
    return _their_symmetric(w, 0.0 if one_sided else -step * k, step * k, bits)


@pytest.mark.parametrize("shift", [0.0, 3.0])  # signed, and one-sided (a norm gain ≥ 0)
def test_grid_weight_quantiser_matches_their_mse_grid(shift):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(24, 40, generator=g, dtype=torch.float64) * 0.05
    w[3, 7] = 0.6  # an outlier weight: the grid's range trades clipping against resolution
    w = (w + shift).abs() if shift else w
    ours = grid_quantize_weight(w, 8).numpy()
    ref = _their_mse_weight(w.numpy())
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)
    levels = np.unique(np.round(ref / np.min(np.abs(ref[ref != 0]))))
    assert len(levels) <= 256 and not np.array_equal(ours, w.numpy())


def test_exact_percentile_matches_numpy():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 17, 29, generator=g, dtype=torch.float64)
    for p in (99.999, 99.0, 75.0):
        lo, hi = exact_percentile_range(x, p)
        ref = np.percentile(x.numpy(), (100 - p, p))
        np.testing.assert_allclose([lo, hi], ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("a_range", ["running", "running-percentile"])
def test_running_range_matches_their_estimator(a_range):
    """Their RunningMinMaxEstimator (momentum 0.9, first batch as it is) quantising with its
    range so far during estimation, then fixed; the asymmetric quantiser on a new batch."""
    cfg = scheme("w8a8-paper", a_range=a_range)
    aq = ActQuant(cfg)
    aq.mode = "observe"
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 9, 16, generator=g, dtype=torch.float64) * (1 + i) + i * 0.3
               for i in range(4)]
    lo = hi = None
    for x in batches:
        xn = x.numpy()
        if a_range == "running":
            b_lo, b_hi = xn.min(), xn.max()
        else:
            b_lo, b_hi = np.percentile(xn, (100 - 99.999, 99.999))
        lo, hi = (b_lo, b_hi) if lo is None else (0.1 * b_lo + 0.9 * lo, 0.1 * b_hi + 0.9 * hi)
        during = aq(x).numpy()
        np.testing.assert_allclose(during, _their_asymmetric(xn, lo, hi), rtol=0, atol=1e-12)
    aq.finalize()
    aq.mode = "quant"
    x = torch.randn(2, 9, 16, generator=g, dtype=torch.float64) * 5
    np.testing.assert_allclose(aq(x).numpy(), _their_asymmetric(x.numpy(), lo, hi),
                               rtol=0, atol=1e-12)


# -- the sites -----------------------------------------------------------------------------------


def _tiny(preset: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, **{**PRESETS[preset], **kw})
    model = GPT(cfg).eval()
    with torch.no_grad():  # trained-looking gains (1.0 is exactly on their grid)
        for n, p in model.named_parameters():
            if n.endswith(("norm.weight", "norm.gain")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _quantised(model: GPT):
    cfg = scheme("w8a8-paper")
    q = wrap(model, cfg)
    g = torch.Generator().manual_seed(4)
    calibrate(q, cfg, [torch.randint(0, 260, (2, 16), generator=g) for _ in range(3)], logits_of)
    return q


def _sites_run(q: nn.Module, x: torch.Tensor) -> list[str]:
    """The activation quantisers that quantised something in one forward, by name."""
    names = {id(m.out_act): f"{n}.output" for n, m in q.named_modules()
             if isinstance(m, QuantLinear) and m.out_act is not None}
    ran: list[str] = []
    hooks = [a.register_forward_hook(
        lambda mod, i, o: ran.append(getattr(mod, "point_name", None) or names[id(mod)]))
        for a in q.modules() if isinstance(a, ActQuant)]
    logits_of(q, x)
    for h in hooks:
        h.remove()
    assert all(a.mode == "quant" for a in q.modules() if isinstance(a, ActQuant))
    return ran


def _block_sites(i: int, *, norms: tuple[str, ...], qk: bool, post: bool) -> list[str]:
    b = f"blocks.{i}"
    attn = [f"{b}.attn.{s}" for s in ("q", "k", "v")]
    if qk:
        attn += [f"{b}.attn.q_norm", f"{b}.attn.k_norm"]
    attn += [f"{b}.attn.{s}" for s in ("scores", "probs", "context")] + [f"{b}.attn.proj.output"]
    mlp = [f"{b}.mlp.act", f"{b}.mlp.proj.output"]
    if post:
        return [*attn, f"{b}.attn_sum", f"{b}.attn_norm", *mlp, f"{b}.mlp_sum", f"{b}.mlp_norm"]
    first = [f"{b}.{norms[0]}"] if norms[0] else []
    second = [f"{b}.{norms[1]}"] if norms[1] else []
    return first + attn + [f"{b}.attn_sum"] + second + mlp + [f"{b}.resid_post"]


@pytest.mark.parametrize("preset", ["pre-ln", "op", "post-ln"])
def test_paper_sites_are_exactly_their_list(preset):
    model = _tiny(preset)
    q = _quantised(model)
    ran = _sites_run(q, torch.randint(0, 260, (2, 16)))
    qk = preset == "op"
    if preset == "pre-ln":
        norms = [("attn_norm", "mlp_norm")] * 2
    elif preset == "op":  # a norm on the first block's attention input only
        norms = [("attn_norm", None), (None, None)]
    else:
        norms = [(None, None)] * 2
    expected = ["embed.resid_post"]
    for i in range(2):
        expected += _block_sites(i, norms=norms[i], qk=qk, post=preset == "post-ln")
    if model.config.final_norm:
        expected.append("final_norm")
    assert sorted(ran) == sorted(expected)  # each site once per forward, nothing else
    assert len(ran) == len(expected) == {"pre-ln": 28, "op": 29, "post-ln": 27}[preset]
    # weights: every linear but the head, both embedding tables, every norm gain (not biases)
    linears = [f"blocks.{i}.{m}" for i in range(2)
               for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")]
    assert sorted(n for n, m in q.named_modules() if isinstance(m, QuantLinear)) == sorted(linears)
    assert all(m.weight_q is not None and not torch.equal(m.weight_q, m.weight)
               for m in q.modules() if isinstance(m, QuantLinear))
    fp = dict(model.named_parameters())
    changed = sorted(n for n, p in q.named_parameters()
                     if n in fp and not torch.equal(p, fp[n]))
    gains = [n for n in fp if n.endswith(("norm.weight", "norm.gain"))]
    assert changed == sorted(["tok_emb.weight", "pos_emb.weight", *gains])
    assert torch.equal(q.lm_head.weight, fp["tok_emb.weight"])  # the head stays FP (tied table)


def test_site_path_equals_the_model_forward_without_quantisation():
    """The written-out attention (sites = identities) is the model's own forward, every option."""
    for kw in ({"pos_encoding": "rotary", "qk_norm": True, "logit_softcap": 5.0,
                "attn": "clipped", "attn_gate": "head", "attn_bias_kv": True},
               {"attn": "softpick", "attn_gate": "elem"}):
        model = _tiny("pre-ln", **kw)
        x = torch.randint(0, 260, (2, 16))
        ref = model(x)

        same = SimpleNamespace(**{s: (lambda t: t) for s in ATTENTION_SITES})
        for b in model.blocks:
            b.attn.sites = same
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)


def test_paper_scheme_refuses_other_models_and_is_close_at_16_bits():
    with pytest.raises(ConfigError, match="w8a8-outputs"):
        wrap(nn.Sequential(nn.Linear(4, 4)), scheme("w8a8-paper"))
    model = _tiny("pre-ln")
    x = torch.randint(0, 260, (2, 16))
    cfg = scheme("w8a8-paper", w_bits=16, a_bits=16)
    assert cfg.name == "w8a8-paper-w16a16"
    q = wrap(model, cfg)
    calibrate(q, cfg, [x], logits_of)
    ref = model(x)
    assert (logits_of(q, x) - ref).abs().max() < 1e-2 * ref.abs().max()
    q8 = _quantised(model)
    assert (logits_of(q8, x) - ref).abs().max() > (logits_of(q, x) - ref).abs().max()


def test_old_w8a8_paper_results_load_as_w8a8_outputs(tmp_path):
    run = RunFolder(tmp_path)
    run.quant_dir.mkdir(parents=True)
    old = {"scheme": "w8a8-paper", "fp_ppl": 10.0, "quant_ppl": 11.0,
           "config": scheme("w8a8-outputs").to_dict() | {"name": "w8a8-paper"}}
    old["config"].pop("paper_sites")
    old["config"].pop("quantize_inputs")
    run.quant_file("w8a8-paper").write_text(json.dumps(old))
    assert set(run.quant_results()) == {"w8a8-outputs"}
    assert run.quant_results()["w8a8-outputs"]["quant_ppl"] == 11.0
    assert run.is_legacy_quant("w8a8-paper")
    run.file_legacy_quant("w8a8-paper")  # before the new scheme runs: nothing is lost
    assert not run.quant_file("w8a8-paper").exists()
    assert json.loads(run.quant_file("w8a8-outputs").read_text())["quant_ppl"] == 11.0
    new = {"scheme": "w8a8-paper", "fp_ppl": 10.0, "quant_ppl": 12.0,
           "config": scheme("w8a8-paper").to_dict()}
    run.quant_file("w8a8-paper").write_text(json.dumps(new))
    assert {k: v["quant_ppl"] for k, v in run.quant_results().items()} == {
        "w8a8-outputs": 11.0, "w8a8-paper": 12.0}
    assert not run.is_legacy_quant("w8a8-paper")
