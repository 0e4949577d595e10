"""Mixture-of-experts layers: experts stored as 3-D parameters are fake-quantised per expert and
output channel (checked against float64 numpy by hand), in both layouts transformers uses;
routers stay in 16-bit, as serving engines keep them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from outlierlab.quant import quantize_and_evaluate, scheme
from outlierlab.quant.calibrate import calibrate
from outlierlab.quant.evaluate import logits_of
from outlierlab.quant.wrap import QuantExperts, linear_names, quant_experts, router_names, wrap

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

V = 96


def moe(family: str):
    T = transformers
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_experts_per_tok=2)  # fmt: skip
    if family == "mixtral":  # (E, out, in), F.linear per expert
        cfg = T.MixtralConfig(intermediate_size=48, num_local_experts=4, **common)
    else:  # gpt_oss: (E, in, out) with biases, x @ W per expert (is_transposed)
        cfg = T.GptOssConfig(intermediate_size=48, num_local_experts=4, head_dim=8, **common)
    torch.manual_seed(0)
    return T.AutoModelForCausalLM.from_config(cfg).eval()


def per_row_int8(w: np.ndarray) -> np.ndarray:
    """Symmetric 8-bit min-max fake quantisation of each row of w (out, in), in float64."""
    scale = np.maximum(np.abs(w).max(1, keepdims=True), 1e-12) / 127.0
    return np.clip(np.round(w / scale), -127, 127) * scale


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_experts_quantised_per_expert_and_output_channel(family):
    model = moe(family)
    cfg = scheme("w8a8-dynamic", w_range="minmax")  # per-channel symmetric min-max weights
    q = wrap(model, cfg)
    experts = quant_experts(q)
    assert list(experts) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    calibrate(q, cfg, [torch.randint(0, V, (2, 8))], logits_of)
    src = model.model.layers[1].mlp.experts
    got = experts["model.layers.1.mlp.experts"].experts
    transposed = family == "gpt_oss"
    for name, p in src.named_parameters(recurse=False):
        if p.dim() != 3:
            continue
        w = p.detach().double().numpy()
        want = []
        for e in range(w.shape[0]):
            we = w[e].T if transposed else w[e]  # (out, in)
            qe = per_row_int8(we)
            want.append(qe.T if transposed else qe)
        np.testing.assert_allclose(getattr(got, name).detach().double().numpy(), np.stack(want),
                                   rtol=0, atol=1e-6)  # fmt: skip
    assert torch.equal(src.gate_up_proj, model.model.layers[1].mlp.experts.gate_up_proj)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_moe_priced_with_experts_rows_and_16_bits_is_exact(family):
    model = moe(family)
    x = torch.randint(0, V, (4, 17))
    calib = [torch.randint(0, V, (2, 16)) for _ in range(2)]
    res = quantize_and_evaluate(model, scheme("w8a8-tensor"), calib, x[:, :-1], x[:, 1:], 2, 2)
    rows = [r for r in res["layers"] if r["kind"] == "experts"]
    assert [r["name"] for r in rows] == [f"model.layers.{i}.mlp.experts" for i in range(2)]
    assert all(30 < r["weight_sqnr_db"] < 60 and r["act_sqnr_db"] > 20 for r in rows)
    assert res["quant_ppl"] != res["fp_ppl"]
    full = scheme("w8a8-tensor", w_bits=16, a_bits=16)
    res16 = quantize_and_evaluate(model, full, calib, x[:, :-1], x[:, 1:], 2, 2)
    assert res16["quant_ppl"] == pytest.approx(res16["fp_ppl"], rel=1e-3)


def test_router_linears_stay_in_full_precision():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 4, bias=False)  # the router: 4 experts
            self.up_proj = nn.Linear(8, 16)
            self.gate_proj = nn.Linear(8, 16)  # a gated MLP's gate: not a router

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PretrainedConfig(num_experts=4)
            self.layers = nn.ModuleList([Block()])

    m = Model()
    assert router_names(m) == {"layers.0.gate"}
    assert linear_names(m) == ["layers.0.up_proj", "layers.0.gate_proj"]
    assert not any(isinstance(x, QuantExperts) for x in wrap(m, scheme("w8a8-tensor")).modules())


class Fp32Linear(nn.Linear):
    """A linear with a forward of its own (as Ergo's router and head: fp32 logits)."""

    def forward(self, x):
        return nn.functional.linear(x.float(), self.weight.float())


def test_custom_linear_router_and_head_stay_in_full_precision():
    """A router held as ``gate.linear`` and a head, both custom-forward linears: neither is
    wrapped; another custom linear is, and model code still reads its ``in_features``."""

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = Fp32Linear(8, 4, bias=False)  # 4 experts

        def forward(self, x):
            return self.linear(x.reshape(-1, self.linear.in_features))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PretrainedConfig(num_experts=4)
            self.gate = Router()
            self.proj = Fp32Linear(8, 8, bias=False)
            self.lm_head = Fp32Linear(8, 16, bias=False)

        def forward(self, x):
            h = self.proj(x)
            return self.gate(h).sum() + self.lm_head(h).sum() + self.proj.in_features

    m = Model()
    assert router_names(m) == {"gate.linear"}
    q = wrap(m, scheme("w8a8-tensor"))
    assert list(quant_experts(q)) == ["proj"]
    assert isinstance(q.gate.linear, Fp32Linear) and isinstance(q.lm_head, Fp32Linear)
    assert q.proj.in_features == 8
    assert torch.isfinite(q(torch.randn(3, 8)))
