"""The authors' metrics (science §1 [code]): kurtosis_authors, corr_authors, attention entropy.

The references are literal float64 numpy ports of bobby-he/simplified_transformers
``train_utils.py`` (``compute_loss``), written from that code, not from ours.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from outlierlab import fused
from outlierlab import metrics as M
from outlierlab import stats as S
from outlierlab.model import GPT, GPTConfig
from outlierlab.model import attn as M_attn
from outlierlab.monitor import OutlierMonitor
from outlierlab.stats import StatsAccumulator
from tolerances import F32_SUMS, F32_SUMS_ABS


def authors_numpy(hidden_states: np.ndarray) -> tuple[float, float]:
    """train_utils.py, ``report_outliers`` branch, line by line (torch → numpy, float64)."""
    x = hidden_states.astype(np.float64)  # (Batch, Seqlen, Width)
    x = x - x.mean(axis=-1, keepdims=True)  # Centre across width (optional)
    x_rms = np.sqrt((x**2).mean()) + 1e-8
    flat_x = x.reshape(-1, x.shape[-1]) / x_rms  # (Batch * Seqlen, Width)
    bs, dim = flat_x.shape
    feat_gram = flat_x.T @ flat_x / bs
    feat_rms_vec = np.diag(feat_gram)
    kurtosis = feat_rms_vec.var(ddof=1)  # torch.Tensor.var(): unbiased
    batch_gram = flat_x @ flat_x.T / dim
    batch_corrs = batch_gram.flatten()[1:].reshape(bs - 1, bs + 1)[:, :-1].reshape(bs, bs - 1)
    return float(kurtosis), float(batch_corrs.mean())


def entropy_numpy(attn_mat: np.ndarray) -> float:
    """``ent = -torch.nansum(attn_mat * torch.log(attn_mat), dim=-1); ent.mean()``."""
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(attn_mat * np.log(attn_mat), axis=-1)
    return float(ent.mean())


def planted(b=3, t=40, d=24, seed=0, shift=0.7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, t, d, generator=g) + shift  # a common offset: centring matters
    x[..., 5] *= 12
    x[..., 17] *= 4
    x[1] *= 3  # tokens of unequal norm: corr_authors ≠ mean cosine
    return x


def test_literal_port_of_the_authors_code():
    for seed in range(3):
        x = planted(seed=seed)
        kurt, corr = authors_numpy(x.numpy())
        assert M.kurtosis_authors(x) == pytest.approx(kurt, rel=1e-10)
        assert M.corr_authors(x) == pytest.approx(corr, rel=1e-9, abs=1e-13)


def test_hand_computed_values():
    # every token (1, 2) centres to (-0.5, 0.5): equal neuron RMS, identical tokens
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert M.kurtosis_authors(x) == 0.0
    assert M.corr_authors(x) == pytest.approx(1.0, rel=1e-7)  # 1e-8 in x_rms
    # tokens (1, -1, 0) and (-1, 1, 0) (already centred): s² = (1, 1, 0), x_rms² = 2/3
    y = torch.tensor([[1.0, -1.0, 0.0], [-1.0, 1.0, 0.0]])
    v = np.array([1.0, 1.0, 0.0]) / (2 / 3)
    assert M.kurtosis_authors(y) == pytest.approx(v.var(ddof=1), rel=1e-7)  # = 0.75
    assert M.corr_authors(y) == pytest.approx(-1.0, rel=1e-7)  # Gram entry −2/(3 · 2/3)


def test_kurtosis_authors_is_unbiased_kurt_minus_one_of_centred_x():
    x = planted()
    d = x.shape[-1]
    assert M.kurtosis_authors(x) == pytest.approx(d / (d - 1) * M.kurtosis_centred(x), rel=1e-7)


def test_degenerate_inputs():
    assert math.isnan(M.corr_authors(torch.ones(1, 8)))  # one token: no pair
    assert math.isnan(M.kurtosis_authors(torch.ones(4, 1)))  # one neuron: no variance
    assert M.kurtosis_authors(torch.ones(5, 8)) == 0.0  # all zero after centring


moderate = st.floats(0.05, 20.0)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), moderate)
def test_scale_invariant(seed, a):
    x = planted(seed=seed)
    assert M.kurtosis_authors(a * x) == pytest.approx(M.kurtosis_authors(x), rel=1e-6)
    assert M.corr_authors(a * x) == pytest.approx(M.corr_authors(x), rel=1e-6, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(-50.0, 50.0))
def test_permutations_and_per_token_offsets(seed, offset):
    x = planted(seed=seed).reshape(-1, 24).double()  # float64: the offset adds no rounding
    g = torch.Generator().manual_seed(seed)
    neurons, tokens = torch.randperm(24, generator=g), torch.randperm(x.shape[0], generator=g)
    shift = offset * torch.randn(x.shape[0], 1, generator=g, dtype=torch.float64)
    shifted = x + shift  # one constant per token: centring removes it
    for y in (x[:, neurons], x[tokens], shifted):
        assert M.kurtosis_authors(y) == pytest.approx(M.kurtosis_authors(x), rel=1e-9)
        assert M.corr_authors(y) == pytest.approx(M.corr_authors(x), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("extras", [False, True])
def test_streaming_equals_one_shot(monkeypatch, extras):
    monkeypatch.setattr(S, "_SCRATCH", 24 * 7)  # 7-row float64 chunks: the chunked path
    monkeypatch.setattr(S, "_F32_ROWS", 7)  # and 7-row float32 chunks
    x = planted()
    mask = torch.rand(x.shape[:-1], generator=torch.Generator().manual_seed(1)) > 0.3
    acc = StatsAccumulator(24, extras=extras, authors=True)
    for xb, mb in zip(x, mask):
        acc.update(xb, mask=mb)
    kept = x[mask]
    res = acc.result()
    # float32 input: extras sums in float64, the authors' sums alone in float32 chunks
    rel, abs_ = (1e-10, 1e-13) if extras else (F32_SUMS, F32_SUMS_ABS)
    assert res["kurtosis_authors"] == pytest.approx(M.kurtosis_authors(kept), rel=rel)
    assert res["corr_authors"] == pytest.approx(M.corr_authors(kept), rel=rel, abs=abs_)
    parts = [StatsAccumulator(24, authors=True).update(xb) for xb in x]
    parts[0].merge(parts[1]).merge(parts[2])
    assert parts[0].result()["corr_authors"] == pytest.approx(M.corr_authors(x), rel=F32_SUMS,
                                                             abs=F32_SUMS_ABS)
    x64 = x.double()  # float64 input: float64 sums, exact to rounding order
    parts64 = [StatsAccumulator(24, authors=True).update(xb) for xb in x64]
    parts64[0].merge(parts64[1]).merge(parts64[2])
    assert parts64[0].result()["corr_authors"] == pytest.approx(M.corr_authors(x64), rel=1e-10)
    assert "kurtosis_authors" not in StatsAccumulator(24, extras=False).update(x).result()


# -- attention entropy ------------------------------------------------------------------------


def test_entropy_of_uniform_and_one_hot_causal_attention():
    t = 9
    uniform = M.causal_attention_probs(torch.zeros(2, 3, t, t))
    expect = np.mean([math.log(i + 1) for i in range(t)])
    assert M.attention_entropy(uniform) == pytest.approx(expect, rel=1e-6)
    assert M.attention_entropy(uniform) == pytest.approx(entropy_numpy(uniform.numpy()), rel=1e-6)
    spike = torch.full((1, 1, t, t), -1e4)
    spike[..., 0] = 0.0  # every query attends to the first token only
    assert M.attention_entropy(M.causal_attention_probs(spike)) == pytest.approx(0.0, abs=1e-6)


def test_entropy_matches_the_authors_nansum_on_random_logits():
    g = torch.Generator().manual_seed(0)
    probs = M.causal_attention_probs(3 * torch.randn(2, 4, 16, 16, generator=g))
    assert M.attention_entropy(probs) == pytest.approx(entropy_numpy(probs.numpy()), rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.0, 60.0), st.integers(1, 40))
def test_softmax_entropy_from_logits_equals_the_authors_nansum(seed, scale, t):
    """The log-free form Σ p (m − z) − log p* on causal softmax rows, from flat to one-hot
    (scale 60: near-zero entropy, the regime of entropy collapse), against float64 numpy."""
    g = torch.Generator().manual_seed(seed)
    z = scale * torch.randn(2, 3, t, t, generator=g)
    zm = z.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), -math.inf)
    probs = zm.softmax(-1)
    rows = probs[..., 0].numel()
    want = entropy_numpy(probs.double().numpy())  # the authors' nansum on the same probs
    got = float(M.softmax_entropy_sum(probs, zm)) / rows
    assert got == pytest.approx(want, rel=1e-5, abs=2e-6)
    assert got >= -1e-6
    assert got <= np.mean([math.log(i + 1) for i in range(t)]) + 1e-5  # log(t + 1) per row
    # the monitor's form: finite masked logits (the most negative float32), used as scratch
    zf = z + M_attn.causal_bias(t, t, finite=True)
    assert torch.equal(zf.softmax(-1), probs)
    scratch = float(M.softmax_entropy_sum(probs, zf, overwrite=True)) / rows
    assert scratch == pytest.approx(got, rel=1e-6, abs=1e-7)


def tiny_gpt(**kw):
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64, **kw)
    return GPT(cfg).eval()


def direct_entropy(model, idx):
    """Entropy per layer from each block's attention input, recomputed from scratch."""
    out, seen = {}, {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, i=i: seen.__setitem__(i, a[0]))
             for i, b in enumerate(model.blocks)]  # fmt: skip
    with torch.no_grad():
        model(idx)
    for h in hooks:
        h.remove()
    for i, b in enumerate(model.blocks):
        logits = b.attn.attention_logits(seen[i])
        out[f"blocks.{i}.attn"] = M.attention_entropy(M.causal_attention_probs(logits))
    return out


@pytest.mark.parametrize("kw", [{}, {"logit_softcap": 5.0}, {"qk_norm": True}])
def test_gpt_attention_entropy_per_layer(kw, hook_path, monkeypatch):
    model = tiny_gpt(**kw)
    idx = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))
    calls, kernel = [], fused.causal_entropy_sum
    monkeypatch.setattr(fused, "causal_entropy_sum", lambda z: calls.append(z.shape) or kernel(z))
    with OutlierMonitor(model, attn_max_tokens=None) as mon, torch.no_grad():
        model(idx)
    assert calls == ([(4, 2, 16, 16)] * 2 if hook_path == "fused" else [])
    got = mon.attention_entropy()
    ref = direct_entropy(model, idx)
    assert list(got) == ["blocks.0.attn", "blocks.1.attn"]
    for name, v in ref.items():
        assert got[name] == pytest.approx(v, rel=1e-6)
    assert mon.to_dict()["attn_entropy"] == pytest.approx(got)


@pytest.mark.parametrize("keep", [2, 1])  # one sequence: the GPT takes a view, not a copy
def test_entropy_subsample_is_whole_sequences_and_seeded(keep, hook_path):
    model = tiny_gpt()
    idx = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(4))
    with OutlierMonitor(model, attn_max_tokens=16 * keep, seed=7) as mon, torch.no_grad():
        model(idx)  # 16 · keep // 16 = keep sequences
    rows = torch.randperm(6, generator=torch.Generator().manual_seed(7))[:keep].sort().values
    ref = direct_entropy(model, idx[rows])
    assert mon.attention_entropy() == pytest.approx(ref, rel=1e-6)


def test_sinks_only_during_measured_forwards():
    model = tiny_gpt()
    seen = []
    model.blocks[0].attn.register_forward_pre_hook(lambda m, a: seen.append(m.probs_sink))
    idx = torch.randint(0, 64, (2, 16))
    with OutlierMonitor(model, every=2) as mon, torch.no_grad():
        for _ in range(3):
            model(idx)
        mon.enabled = False
        model(idx)
    assert [s is not None for s in seen] == [True, False, True, False]
    assert model.blocks[0].attn.probs_sink is None
    def fail(module, args):
        raise RuntimeError("boom")

    h = model.blocks[1].attn.register_forward_pre_hook(fail)  # after block 0 got its sink
    with pytest.raises(RuntimeError, match="boom"), OutlierMonitor(model), torch.no_grad():
        model(idx)
    h.remove()
    assert all(b.attn.probs_sink is None for b in model.blocks)
    with OutlierMonitor(model, attn_entropy=False) as mon, torch.no_grad():
        model(idx)
    assert mon.attention_entropy() == {} and "attn_entropy" not in mon.to_dict()


def test_sharp_attention_has_lower_entropy():
    model = tiny_gpt()
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(5))
    with OutlierMonitor(model, attn_max_tokens=None) as mon, torch.no_grad():
        model(idx)
    before = mon.attention_entropy()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.qkv.weight[: 2 * 32] *= 30  # large q, k: logits far apart (no QK-norm)
    mon2 = OutlierMonitor(model, attn_max_tokens=None)
    with mon2, torch.no_grad():
        model(idx)
    after = mon2.attention_entropy()
    assert all(after[n] < 0.5 * before[n] for n in before)
