"""OutlierMonitor on random-init tiny Hugging Face models built from configs (no downloads)."""

from __future__ import annotations

import pytest
import torch

from outlierlab import OutlierMonitor
from outlierlab import metrics as M
from tolerances import F32_SUMS

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.hf

L, D, V = 3, 32, 96


def build(family: str):
    T = transformers
    common = dict(vocab_size=V, max_position_embeddings=64)
    if family == "gpt2":
        cfg = T.GPT2Config(
            n_layer=L,
            n_embd=D,
            n_head=2,
            vocab_size=V,
            n_positions=64,
            bos_token_id=0,
            eos_token_id=0,
        )
        blocks = lambda m: m.transformer.h  # noqa: E731
    elif family == "llama":
        cfg = T.LlamaConfig(
            num_hidden_layers=L,
            hidden_size=D,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            **common,
        )
        blocks = lambda m: m.model.layers  # noqa: E731
    elif family == "opt":
        cfg = T.OPTConfig(
            num_hidden_layers=L,
            hidden_size=D,
            num_attention_heads=2,
            ffn_dim=64,
            word_embed_proj_dim=D,
            **common,
        )
        blocks = lambda m: m.model.decoder.layers  # noqa: E731
    elif family == "neox":
        cfg = T.GPTNeoXConfig(
            num_hidden_layers=L,
            hidden_size=D,
            num_attention_heads=2,
            intermediate_size=64,
            **common,
        )
        blocks = lambda m: m.gpt_neox.layers  # noqa: E731
    elif family == "bert":
        cfg = T.BertConfig(
            num_hidden_layers=L,
            hidden_size=D,
            num_attention_heads=2,
            intermediate_size=64,
            **common,
        )
        torch.manual_seed(0)
        m = T.BertForMaskedLM(cfg).eval()
        return m, m.bert.encoder.layer
    torch.manual_seed(0)
    m = T.AutoModelForCausalLM.from_config(cfg).eval()
    return m, blocks(m)


def run(model, blocks, ids, mask=None, **mon_kw):
    """Monitor one forward; also capture block outputs and hidden_states independently."""
    outs = []
    hs = [
        b.register_forward_hook(lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o))
        for b in blocks
    ]
    try:
        with (
            torch.no_grad(),
            OutlierMonitor(model, mmr_max_tokens=None, cos_max_tokens=None, **mon_kw) as mon,
        ):
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    finally:
        for h in hs:
            h.remove()
    return mon, out.hidden_states, outs


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "opt", "neox"])
def test_points_equal_direct_metrics(family):
    model, blocks = build(family)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(1))
    mon, hidden, outs = run(model, blocks, ids)
    res = mon.results()
    assert list(res) == ["embed.resid_post"] + [f"blocks.{i}.resid_post" for i in range(L)]
    assert len(hidden) == L + 1
    # block outputs seen independently agree with hidden_states for all but the last block
    for i in range(L - 1):
        torch.testing.assert_close(outs[i], hidden[i + 1])
    acts = [hidden[0], *outs]  # the last point: the last block's output, before any final norm
    for (name, r), x in zip(res.items(), acts):
        assert r["tokens"] == 20
        assert r["kurtosis"] == pytest.approx(M.kurtosis(x), rel=F32_SUMS), name
        assert r["mmr"] == pytest.approx(M.max_median_ratio(x), rel=1e-9), name
        assert r["cos_sim"] == pytest.approx(M.token_cosine_similarity(x, None), rel=1e-5, abs=1e-7)
        assert r["outlier_neurons"] == M.outlier_neurons(x)
    if family == "gpt2":  # HF's last hidden state is after ln_f, the monitor's is not
        assert not torch.allclose(hidden[-1], outs[-1])


def test_bert_padding_mask_from_kwarg():
    model, blocks = build("bert")
    ids = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[0, 5:] = 0
    mask[2, 9:] = 0
    mon, hidden, outs = run(model, blocks, ids, mask)
    keep = mask.bool()
    res = mon.results()
    assert res["embed.resid_post"]["tokens"] == int(mask.sum())
    assert res["embed.resid_post"]["kurtosis"] == pytest.approx(
        M.kurtosis(hidden[0][keep]), rel=F32_SUMS
    )
    assert res["blocks.2.resid_post"]["kurtosis"] == pytest.approx(
        M.kurtosis(outs[2][keep]), rel=F32_SUMS
    )


def test_planted_outlier_neuron_is_flagged_and_hooks_go():
    model, _blocks = build("gpt2")
    with torch.no_grad():
        model.transformer.wte.weight[:, 7] *= 80
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    with pytest.raises(ValueError, match="stop"), OutlierMonitor(model) as mon:
        model(ids)
        raise ValueError("stop")
    after = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert before == after == 0
    res = mon.results()
    assert res["embed.resid_post"]["outlier_neurons"][0] == 7
    assert res["blocks.0.resid_post"]["outlier_neurons"][0] == 7
    assert res["embed.resid_post"]["kurtosis"] > 10


@pytest.mark.parametrize("family", ["gpt2", "opt", "llama", "neox", "bert"])
def test_structure_discovers_blocks_final_norm_and_attention(family):
    from outlierlab.structure import discover

    model, blocks = build(family)
    st = discover(model)
    assert st.source == "discovered"
    assert st.blocks == list(blocks)
    pts = st.points()
    want = ["embed.resid_post"] + [f"blocks.{i}.resid_post" for i in range(L)]
    assert [p.name for p in pts] == want
    assert pts[0].module is blocks[0] and pts[0].kind == "input"  # what block 0 sees
    assert list(st.attention) == [f"blocks.{i}.attn" for i in range(L)]
    assert all("Attention" in type(m).__name__ for m, _ in st.attention.values())
    if family != "bert":  # post-norm encoder: no final norm beside its layers
        assert st.final_norm is not None and st.final_norm.rsplit(".", 1)[-1] in (
            "ln_f", "final_layer_norm", "norm", "final_layernorm")  # fmt: skip


@pytest.mark.parametrize("family", ["gpt2", "llama", "opt", "neox"])
def test_attention_entropy_of_hf_models_leaves_outputs_unchanged(family):
    """attn_entropy=True reads HF attention probabilities through eager attention while hooked:
    the logits meanwhile equal SDPA's to rounding, the implementation is switched back after,
    and each layer's mean entropy matches the eager attentions transformers returns."""
    model, _ = build(family)
    model.eval()
    impl = model.config._attn_implementation
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with OutlierMonitor(model, attn_entropy=True, attn_max_tokens=None) as mon:
            during = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert model.config._attn_implementation == impl
    torch.testing.assert_close(during, before, rtol=0, atol=1e-5)
    assert torch.equal(after, before)
    ent = mon.attention_entropy()
    assert list(ent) == [f"blocks.{i}.attn" for i in range(L)]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(input_ids=ids, output_attentions=True).attentions
    model.set_attn_implementation(impl)
    for i, a in enumerate(att):
        p = a.double()
        want = float(-(p * torch.log(p.clamp_min(1e-300))).sum(-1).mean())
        assert ent[f"blocks.{i}.attn"] == pytest.approx(want, rel=1e-5)
