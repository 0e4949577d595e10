"""The leaderboard's schemes (issue 25): ``w6a6-tensor`` and ``w4a4-online`` against float64
references on tiny tensors, and the QuaRot-style rotation of outlierlab's GPT
(:func:`outlierlab.quant.rotate.rotate_gpt`), which must leave the function unchanged for every
block and mitigation the mitigations preset trains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from outlierlab.errors import ConfigError
from outlierlab.model.config import GPTConfig
from outlierlab.model.gpt import GPT
from outlierlab.quant import calibrate, quant_linears, scheme, wrap
from outlierlab.quant.evaluate import logits_of, prepared
from outlierlab.quant.rotate import CentredRMSNorm, hadamard, rotate, rotate_gpt

CONFIGS = {
    "pre-ln": {},
    "op": {"preset": "op"},
    "pre-rms": {"norm": "rmsnorm"},
    "osp": {"norm": "ssnorm", "embed_proj": True},
    "gates-kv": {"attn_gate": "elem", "attn_bias_kv": True, "attn": "softmax1", "bias": True},
    "op-gate-head": {"preset": "op", "attn_gate": "head", "pos_encoding": "rotary"},
}


def tiny_gpt(preset: str = "pre-ln", **fields) -> GPT:
    """A float64 GPT (2 × 16, MLP 64) with random norm gains and biases, so folding matters."""
    base = GPTConfig.preset(preset).to_dict()
    base.update(vocab_size=23, n_layer=2, d_model=16, n_head=2, seq_len=12, **fields)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**base)).double().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 2.0)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5)
        model.tok_emb.weight[:, 3] += 4.0  # an outlier channel in the stream
    return model


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("online", [False, True])
def test_rotated_gpt_computes_the_same_logits_in_float64(name, online):
    fields = dict(CONFIGS[name])
    model = tiny_gpt(fields.pop("preset", "pre-ln"), **fields)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rot = rotate(model, online_hadamard=online)
    idx = torch.randint(0, 23, (3, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(rot(idx), model(idx), rtol=0, atol=1e-10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # untouched
    assert rot.lm_head.weight is not rot.tok_emb.weight  # the head was untied
    assert hasattr(rot.blocks[0].mlp.proj, "online_hadamard") == online


def test_the_rotation_spreads_the_outlier_channel_and_layernorm_becomes_centred_rms():
    model = tiny_gpt()
    rot = rotate_gpt(model)
    assert isinstance(rot.blocks[0].attn_norm, CentredRMSNorm)
    assert isinstance(rot.final_norm, CentredRMSNorm)
    emb, emb_rot = model.tok_emb.weight.detach(), rot.tok_emb.weight.detach()
    # the same norm per token, but channel 3's +4 spread over all 16 channels (Hadamard: 4/4)
    torch.testing.assert_close(emb_rot.norm(dim=1), emb.norm(dim=1))
    assert emb.abs().max() > 3.5 > 1.5 > emb_rot.abs().max()
    with pytest.raises(ConfigError, match="pre or OP blocks"):
        rotate_gpt(tiny_gpt("post-ln"))


def test_centred_rms_norm_is_a_layernorm_without_affine_in_the_rotated_basis():
    d = 8
    q = torch.as_tensor(hadamard(d), dtype=torch.float64) / d**0.5
    x = torch.randn(5, d, dtype=torch.float64) + 3.0
    ln = nn.functional.layer_norm(x, (d,), eps=1e-5)
    u = torch.full((1, d), d**-0.5, dtype=torch.float64) @ q
    torch.testing.assert_close(CentredRMSNorm(u[0], 1e-5)(x @ q), ln @ q, rtol=0, atol=1e-12)


def _grid_asym(x: np.ndarray, lo: float, hi: float, bits: int) -> np.ndarray:
    """Asymmetric static fake quantisation in float64 (science §4): scale (hi − lo)/(2^b − 1)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    s = (hi - lo) / (2**bits - 1)
    z = np.round(-lo / s)
    return (np.clip(np.round(x / s) + z, 0, 2**bits - 1) - z) * s


def _sym(x: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """Symmetric min-max fake quantisation per row (``axis`` −1: per token / output channel)."""
    qmax = 2 ** (bits - 1) - 1
    s = np.abs(x).max(axis=axis, keepdims=True) / qmax
    return np.clip(np.round(x / s), -qmax, qmax) * s


class One(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.lin = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_w6a6_tensor_is_a_6_bit_grid_on_both_sides():
    cfg = scheme("w6a6-tensor")
    assert (cfg.w_bits, cfg.a_bits, cfg.a_granularity, cfg.name) == (6, 6, "tensor", "w6a6-tensor")
    model = One(8, 5).eval()
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))
    q = wrap(model, cfg)
    calibrate(q, cfg, [x], lambda m, b: m(b))
    lin = quant_linears(q)["lin"]
    wq = lin.weight_q.double().numpy()
    s = np.abs(wq).max() / 31  # one symmetric scale per tensor, ±31 levels
    levels = wq / s
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)
    assert np.abs(levels).max() == pytest.approx(31) and len(np.unique(np.round(levels))) <= 63
    xd = x.double().numpy()
    want = _grid_asym(xd, xd.min(), xd.max(), 6) @ wq.T + lin.bias.double().numpy()
    np.testing.assert_allclose(q(x).double().numpy(), want, rtol=0, atol=1e-5)


def test_w4a4_online_rotates_down_proj_inputs_and_rounds_to_nearest_4_bit():
    cfg = scheme("w4a4-online")
    assert (cfg.w_bits, cfg.a_bits, cfg.w_method, cfg.rotation) == (4, 4, "rtn", "quarot")
    assert (cfg.w_granularity, cfg.a_granularity, cfg.a_symmetric) == ("channel", "token", True)
    model = tiny_gpt()
    rot, _ = prepared(model, cfg)
    q = wrap(rot, cfg)
    idx = torch.randint(0, 23, (2, 12), generator=torch.Generator().manual_seed(4))
    calibrate(q, cfg, [idx], logits_of)
    down = quant_linears(q)["blocks.0.mlp.proj"]
    assert down.online_hadamard is not None
    proj = rot.blocks[0].mlp.proj
    seen = []  # the down-projection's input before the online Hadamard (hooked first)
    hook = proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]), prepend=True)
    with torch.no_grad():
        rot(idx)
        out = down(seen[0]).numpy()  # the quantised layer on the same input
    hook.remove()
    n = 64
    h = hadamard(n).double().numpy() / n**0.5
    x = seen[0].numpy()  # float64: x·H/√n online, then symmetric 4-bit per token
    w = proj.weight.detach().numpy()  # W·H/√n offline, then symmetric 4-bit per channel
    want = _sym(x @ h, 4, -1) @ _sym(w, 4, -1).T
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-9)  # weights round in float32
