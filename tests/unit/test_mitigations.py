"""The published mitigations of outlier features (docs/mitigations.md), each checked against its
paper's equation on tiny float64 tensors with an independent numpy reference: softmax-plus-one,
softpick, clipped softmax, attention bias, gated attention, single-scale RMSNorm, OSP's
embedding projection, the TWEO penalty and OrthoAdam."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from outlierlab import config, optim
from outlierlab.errors import ConfigError
from outlierlab.model import GPT, GPTConfig, attention, attention_probs, tweo_penalty
from outlierlab.model.gpt import SRMSNorm, SSNorm
from outlierlab.optim.muon import muon_params
from outlierlab.optim.orthoadam import OrthoAdam
from outlierlab.train.step import TrainStep

TINY = {"vocab_size": 64, "n_layer": 2, "d_model": 16, "n_head": 2, "seq_len": 8}
ZETA, GAMMA = 1.2, -0.1


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def ref_probs(z: np.ndarray, kind: str, zeta: float = ZETA, gamma: float = GAMMA,
              n_bias: int = 0) -> np.ndarray:
    """Each paper's formula, row by row, on the visible keys of a causal row (the first
    ``n_bias`` columns always visible), straight from the definition (no max subtraction)."""
    out = np.zeros_like(z)
    t_q, t_k = z.shape[-2], z.shape[-1] - n_bias
    for idx in np.ndindex(*z.shape[:-2]):
        for i in range(t_q):
            seen = n_bias + i + 1 + (t_k - t_q)
            x = z[idx][i, :seen]
            if kind == "softmax":
                p = np.exp(x) / np.exp(x).sum()
            elif kind == "softmax1":
                p = np.exp(x) / (1.0 + np.exp(x).sum())
            elif kind == "softpick":
                p = np.maximum(np.exp(x) - 1.0, 0.0) / np.abs(np.exp(x) - 1.0).sum()
            else:  # clipped
                p = np.clip((zeta - gamma) * np.exp(x) / np.exp(x).sum() + gamma, 0.0, 1.0)
            out[idx][i, :seen] = p
    return out


KINDS = ["softmax", "softmax1", "softpick", "clipped"]


@pytest.mark.parametrize("kind", KINDS)
def test_probabilities_match_each_papers_equation(kind):
    z = _rng(1).normal(size=(2, 3, 5, 5)) * 2.0
    p = attention_probs(torch.from_numpy(z), kind, zeta=ZETA, gamma=GAMMA)
    assert p.dtype == torch.float64
    np.testing.assert_allclose(p.numpy(), ref_probs(z, kind), rtol=1e-7, atol=1e-12)
    assert (p.triu(1) == 0).all()  # nothing leaks to future keys
    # with bias slots (Sun et al.'s prepended key): the first columns visible to every query
    zb = _rng(4).normal(size=(2, 3, 5, 7)) * 2.0
    pb = attention_probs(torch.from_numpy(zb), kind, zeta=ZETA, gamma=GAMMA, n_bias=2)
    np.testing.assert_allclose(pb.numpy(), ref_probs(zb, kind, n_bias=2), rtol=1e-7, atol=1e-12)
    # stable where the naive formula overflows (float32, logits in the thousands)
    big = attention_probs(torch.from_numpy(z).float() * 1000, kind, zeta=ZETA, gamma=GAMMA)
    assert torch.isfinite(big).all() and (big >= 0).all() and (big.sum(-1) <= 1 + 1e-5).all()


def test_clipped_softmax_masks_future_keys_even_with_a_positive_floor():
    z = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    p = attention_probs(z, "clipped", zeta=1.0, gamma=0.05)  # γ > 0: mask must be re-applied
    assert (p.triu(1) == 0).all() and p[0, 0, 0, 0] == 1.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bias", [False, True])
def test_attention_is_the_weights_times_values(kind, bias):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 6, 4, generator=g, dtype=torch.float64) for _ in range(3))
    kb = torch.randn(3, 1, 4, generator=g, dtype=torch.float64) if bias else None
    vb = torch.randn(3, 1, 4, generator=g, dtype=torch.float64) if bias else None
    y = attention(q, k, v, kind, k_bias=kb, v_bias=vb, zeta=ZETA, gamma=GAMMA)
    qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
    if bias:  # Sun et al.: [k'; K], [v'; V], the prepended slot visible to every query
        kn = np.concatenate([np.broadcast_to(kb.numpy(), (2, 3, 1, 4)), kn], axis=2)
        vn = np.concatenate([np.broadcast_to(vb.numpy(), (2, 3, 1, 4)), vn], axis=2)
    z = qn @ kn.swapaxes(-1, -2) / np.sqrt(4)
    want = ref_probs(z, kind, n_bias=int(bias)) @ vn
    np.testing.assert_allclose(y.numpy(), want, rtol=1e-7, atol=1e-10)


def test_plain_softmax_is_sdpa_itself():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 7, 4, generator=g) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(attention(q, k, v), ref)
    with pytest.raises(ValueError, match="allowed: softmax, softmax1, softpick, clipped"):
        attention(q, k, v, "sparsemax")


def model64(**overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(**{**TINY, **overrides})).double().eval()


def _attn_io(model: GPT, idx: torch.Tensor):
    """Block 0's attention input x and the input of its output projection."""
    seen = {}
    attn = model.blocks[0].attn
    h1 = attn.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    h2 = attn.proj.register_forward_pre_hook(lambda m, a: seen.setdefault("y", a[0]))
    with torch.no_grad():
        model(idx)
    h1.remove(), h2.remove()
    return seen["x"].numpy(), seen["y"].numpy()


def _ref_heads(attn, x: np.ndarray, kind: str = "softmax") -> np.ndarray:
    """Causal attention of ``attn``'s weights on x (B, T, d), numpy: (B, T, heads, d_head)."""
    B, T, d = x.shape
    nh = attn.n_head
    qkv = x @ attn.qkv.weight.detach().numpy().T
    q, k, v = (a.reshape(B, T, nh, d // nh).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    z = q @ k.swapaxes(-1, -2) / np.sqrt(d // nh)
    return (ref_probs(z, kind) @ v).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("gate", ["head", "elem"])
def test_gated_attention_matches_qiu_et_al(gate):
    """Y' = SDPA(q, k, v) ⊙ σ(x W_g), per head (W_g: d × heads) or per element (d × d)."""
    model = model64(attn_gate=gate)
    attn = model.blocks[0].attn
    assert attn.gate.weight.shape == ((2, 16) if gate == "head" else (16, 16))
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(4))
    x, y = _attn_io(model, idx)
    s = 1.0 / (1.0 + np.exp(-(x @ attn.gate.weight.detach().numpy().T)))
    heads = _ref_heads(attn, x)  # (B, T, nh, hs)
    want = heads * (s[..., None] if gate == "head" else s.reshape(heads.shape))
    np.testing.assert_allclose(y, want.reshape(y.shape), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_model_attention_and_probs_sink_use_the_configured_function(kind):
    model = model64(attn=kind, clip_zeta=ZETA, clip_gamma=GAMMA)
    attn = model.blocks[0].attn
    got = []

    class Sink:
        def rows(self, batch, seq_len, device):
            return None

        def __call__(self, probs):
            got.append(probs)

    attn.probs_sink = Sink()
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    x, y = _attn_io(model, idx)
    np.testing.assert_allclose(y, _ref_heads(attn, x, kind).reshape(y.shape), rtol=1e-9,
                               atol=1e-12)
    B, T, _ = x.shape
    qkv = x @ attn.qkv.weight.detach().numpy().T
    q, k, _ = (a.reshape(B, T, 2, 8).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    z = q @ k.swapaxes(-1, -2) / np.sqrt(8)
    np.testing.assert_allclose(got[0].numpy(), ref_probs(z, kind), rtol=1e-3, atol=1e-5)

    class LogitSink(Sink):  # as the monitor's: plain softmax hands over the logits instead
        def causal_logits(self, logits):
            got.append(("logits", logits))

    got.clear()
    attn.probs_sink = LogitSink()
    _attn_io(model, idx)
    if kind == "softmax":  # unmasked, scaled; the sink applies the causal mask itself
        assert len(got) == 1 and got[0][0] == "logits"
        np.testing.assert_allclose(got[0][1].numpy(), z, rtol=1e-5, atol=1e-5)
    else:  # the other functions' probabilities are written out
        assert len(got) == 1 and isinstance(got[0], torch.Tensor)
        np.testing.assert_allclose(got[0].numpy(), ref_probs(z, kind), rtol=1e-3, atol=1e-5)


def test_attention_bias_sink_gets_the_token_part():
    model = model64(attn_bias_kv=True)
    attn = model.blocks[0].attn
    assert attn.k_bias.shape == attn.v_bias.shape == (2, 1, 8)
    got = []
    attn.probs_sink = type("S", (), {"rows": lambda self, b, t, d: None,
                                     "__call__": lambda self, p: got.append(p)})()
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(6))
    x, _ = _attn_io(model, idx)
    B, T, _ = x.shape
    qkv = x @ attn.qkv.weight.detach().numpy().T
    q, k, _ = (a.reshape(B, T, 2, 8).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
    k = np.concatenate([np.broadcast_to(attn.k_bias.detach().numpy(), (B, 2, 1, 8)), k], 2)
    want = ref_probs(q @ k.swapaxes(-1, -2) / np.sqrt(8), "softmax", n_bias=1)[..., 1:]
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5, atol=1e-6)
    assert (got[0].sum(-1) < 1).all()  # the bias slot takes the rest
    groups = model.param_groups(0.1)
    no_decay = {id(p) for p in groups[1]["params"]}
    assert id(attn.k_bias) in no_decay and id(attn.v_bias) in no_decay


def test_single_scale_rmsnorm_has_one_scalar_gain():
    """OSP's SSNorm: γ·x/√(mean(x²) + ε), γ one scalar; SRMSNorm (pre-srms) has no γ at all."""
    norm = SSNorm(5).double()
    assert [p.shape for p in norm.parameters()] == [torch.Size([])]
    assert not list(SRMSNorm(5).parameters())
    with torch.no_grad():
        norm.gain.fill_(1.7)
    x = _rng(7).normal(size=(3, 5)) * 4
    want = 1.7 * x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(norm(torch.from_numpy(x)).detach().numpy(), want, rtol=1e-12)
    model = model64(norm="ssnorm")
    kinds = {type(m).__name__ for m in model.modules()}
    assert "SSNorm" in kinds and "LayerNorm" not in kinds


def test_embedding_projection_is_an_orthogonal_linear_after_the_embeddings():
    model = model64(embed_proj=True)
    for w in (model.embed_proj.weight, model.unembed_proj.weight):
        np.testing.assert_allclose((w @ w.T).detach().numpy(), np.eye(16), atol=1e-6)
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(8))
    seen = {}
    model.embed_out.register_forward_hook(lambda m, a, o: seen.setdefault("e", o))
    model.lm_head.register_forward_pre_hook(lambda m, a: seen.setdefault("h", a[0]))
    model.final_norm.register_forward_hook(lambda m, a, o: seen.setdefault("n", o))
    with torch.no_grad():
        model(idx)
    emb = model.tok_emb.weight[idx] + model.pos_emb.weight[:8]
    w1, w2 = model.embed_proj.weight.detach().numpy(), model.unembed_proj.weight.detach().numpy()
    np.testing.assert_allclose(seen["e"].numpy(), emb.detach().numpy() @ w1.T, rtol=1e-10)
    np.testing.assert_allclose(seen["h"].numpy(), seen["n"].numpy() @ w2.T, rtol=1e-10)
    hidden = muon_params(model)  # OSP: Muon trains the projections
    assert id(model.embed_proj.weight) in hidden and id(model.unembed_proj.weight) in hidden


def test_tweo_penalty_matches_the_equation_and_is_added_to_the_loss():
    hs = [torch.from_numpy(_rng(i).normal(size=(2, 3, 4))) for i in range(3)]
    want = np.mean([np.mean(np.abs(h.numpy()) ** 4) for h in hs])
    np.testing.assert_allclose(float(tweo_penalty(hs, 4.0)), want, rtol=1e-12)
    # one SGD step (lr 1, no clip): with λ the update is the CE one minus λ·∂penalty
    lam, p = 0.3, 3.0
    base = model64().train()
    idx = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(9))
    w = {}
    for name, tweo in (("ce", None), ("tweo", (lam, p))):
        m = copy.deepcopy(base)
        step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=1.0), tweo=tweo)
        out = step(idx, idx)
        w[name] = m.blocks[0].mlp.fc.weight.detach().clone()
        if tweo is None:
            assert out.penalty is None
        else:
            penalty = out.penalty
            ce_loss = out.loss
    m = copy.deepcopy(base)
    outs = []
    hooks = [b.register_forward_hook(lambda mod, a, o: outs.append(o)) for b in m.blocks]
    loss = m(idx, idx)[1]
    pen = tweo_penalty(outs, p)
    grad = torch.autograd.grad(pen, m.blocks[0].mlp.fc.weight)[0]
    [h.remove() for h in hooks]
    np.testing.assert_allclose(penalty, lam * float(pen.detach()), rtol=1e-5)
    np.testing.assert_allclose(ce_loss, float(loss.detach()), rtol=1e-6)  # `loss`: the CE
    torch.testing.assert_close(w["tweo"] - w["ce"], -lam * grad, rtol=1e-6, atol=1e-9)


def test_orthoadam_is_adam_in_a_fixed_orthogonal_basis():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
    lr, (b1, b2), eps, wd = 0.01, (0.9, 0.99), 1e-8, 0.1
    opt = OrthoAdam([{"params": [w], "weight_decay": wd}, {"params": [b], "weight_decay": 0.0}],
                    lr=lr, betas=(b1, b2), eps=eps)
    grads = [[_rng(10 + s).normal(size=(4, 3)), _rng(20 + s).normal(size=4)] for s in range(3)]
    bases = [opt.basis(w), opt.basis(b)]
    for ql, qr in bases:
        for q in (ql, qr):
            if q is not None:
                np.testing.assert_allclose((q.T @ q).numpy(), np.eye(len(q)), atol=1e-12)
    assert bases[1][1] is None  # a vector is a d × 1 matrix: one side
    ref = [w.detach().numpy().copy(), b.detach().numpy().copy()]
    moments = [[np.zeros((4, 3)), np.zeros((4, 3))], [np.zeros((4, 1)), np.zeros((4, 1))]]
    for t, gs in enumerate(grads, start=1):
        w.grad, b.grad = torch.from_numpy(gs[0]), torch.from_numpy(gs[1])
        opt.step()
        for i, (g, decay) in enumerate(zip(gs, (wd, 0.0))):
            ql = bases[i][0].numpy()
            qr = bases[i][1].numpy() if bases[i][1] is not None else np.eye(1)
            gt = ql.T @ g.reshape(4, -1) @ qr
            m, v = moments[i]
            m[:] = b1 * m + (1 - b1) * gt
            v[:] = b2 * v + (1 - b2) * gt**2
            u = ql @ ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)) @ qr.T
            ref[i] = ref[i] * (1 - lr * decay) - lr * u.reshape(ref[i].shape)
    np.testing.assert_allclose(w.detach().numpy(), ref[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(b.detach().numpy(), ref[1], rtol=1e-10, atol=1e-12)
    # the same basis is redrawn after a restart (not saved in the state dict)
    again = OrthoAdam([{"params": [w]}, {"params": [b]}], lr=lr)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.basis(w)[0], bases[0][0])
    small = OrthoAdam([w], max_precond_dim=3)  # sides > max_precond_dim are not rotated
    assert small.basis(w)[0] is None and small.basis(w)[1] is not None


def test_options_are_config_fields_with_one_line_errors():
    cfg = config.load("tiny", overrides=[
        "model.attn=softpick", "model.attn_gate=elem", "model.attn_bias_kv=true",
        "model.embed_proj=true", "model.norm=ssnorm", "train.tweo_weight=1e-4",
        "train.tweo_p=4", "optim.name=orthoadam"])  # fmt: skip
    assert (cfg.model.attn, cfg.model.attn_gate, cfg.model.norm) == ("softpick", "elem", "ssnorm")
    assert cfg.model.attn_bias_kv and cfg.model.embed_proj and cfg.train.tweo_weight == 1e-4
    assert cfg.optim.max_precond_dim == 4096 and cfg.optim.lr == 3e-3  # adam family kept lr
    bad = {
        "model.attn=sparsemax": "allowed: softmax, softmax1, softpick, clipped",
        "model.attn_gate=both": "allowed: none, head, elem",
        "model.clip_gamma=0.1": "model.clip_gamma=0.1 is not allowed; allowed: a finite number ≤ 0",
        "model.clip_zeta=0.5": "allowed: a finite number ≥ 1",
        "model.norm=ss": "ssnorm",
        "train.tweo_weight=-1": "allowed: a finite number ≥ 0",
        "train.tweo_p=0.5": "allowed: a finite number ≥ 1",
        "optim.name=orthoadamw": "orthoadam",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as err:
            config.load("tiny", overrides=[override])
        assert "\n" not in str(err.value)
    assert GPTConfig().attn == "softmax" and GPTConfig().attn_gate == "none"


METHODS = {
    "softmax1": ({"attn": "softmax1"}, "adamw"),
    "softpick": ({"attn": "softpick"}, "adamw"),
    "clipped": ({"attn": "clipped"}, "adamw"),
    "gated-head": ({"attn_gate": "head"}, "adamw"),
    "gated-elem": ({"attn_gate": "elem"}, "adamw"),
    "attn-bias": ({"attn_bias_kv": True}, "adamw"),
    "osp": ({"norm": "ssnorm", "embed_proj": True}, "muon"),
    "orthoadam+softmax1": ({"attn": "softmax1"}, "orthoadam"),
    "op+gated": ({"block": "op", "qk_norm": True, "beta": 0.2, "attn_gate": "elem"}, "adamw"),
    "tweo": ({}, "adamw"),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_with_finite_loss(method):
    overrides, name = METHODS[method]
    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, **overrides})).train()
    opt = optim.build_optimizer(model, optim.OptimConfig(name=name))
    step = TrainStep(model, opt, clip=1.0, tweo=(1e-3, 4.0) if method == "tweo" else None)
    x = torch.randint(0, 64, (4, 8), generator=torch.Generator().manual_seed(1))
    losses = [step(x, torch.roll(x, -1, 1)) for _ in range(5)]
    assert all(r.finite for r in losses), losses
    assert losses[-1].loss < losses[0].loss
    assert (losses[-1].penalty is not None) == (method == "tweo")


@pytest.mark.parametrize("kind", ["softmax", "softmax1", "softpick", "clipped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cached_additive_causal_mask_gives_the_same_weights(kind, dtype):
    """The weights computed with the cached −∞ mask added (attention_weights, the monitor's
    entropy) equal, bit for bit, those filled with an explicit bool mask; the mask is built once."""
    from outlierlab.model.attn import attention_probs, attention_weights, causal_mask

    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 7, 8, generator=g, dtype=dtype) for _ in range(2))
    kb = torch.randn(1, 3, 2, 8, generator=g, dtype=dtype)
    for bias in (None, kb):
        fast = attention_weights(q, k, kind, k_bias=bias)
        kk = k if bias is None else torch.cat([bias.expand(2, 3, 2, 8), k], -2)
        logits = q @ kk.transpose(-2, -1) / math.sqrt(8)
        n = 0 if bias is None else 2
        explicit = causal_mask(7, 7, n).clone()  # a fresh tensor: the masked_fill path
        assert torch.equal(fast, attention_probs(logits, kind, explicit))
        assert fast.dtype == dtype
    assert causal_mask(7, 7) is causal_mask(7, 7)  # cached, shared
    assert causal_mask(7, 7).tolist() == torch.ones(7, 7, dtype=torch.bool).tril().tolist()
