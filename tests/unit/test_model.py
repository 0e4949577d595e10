"""GPT: causality, norm layout, β, entropy regulation, init kurtosis, save/load, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from outlierlab.errors import ModelLoadError
from outlierlab.metrics import kurtosis
from outlierlab.model import GPT, GPTConfig
from outlierlab.model.gpt import SRMSNorm

PRESETS = GPTConfig.presets()



TINY = {"vocab_size": 64, "n_layer": 2, "d_model": 32, "n_head": 4, "seq_len": 16}


def tiny(preset: str = "pre-ln", **overrides) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.preset(preset, **{**TINY, **overrides})).eval()


VARIANTS = [(p, {}) for p in PRESETS] + [
    ("pre-ln", {"logit_softcap": 5.0}),
    ("op", {"pos_encoding": "rotary"}),
    ("op", {"qk_norm": False, "logit_softcap": 30.0, "beta_trainable": True}),
    # the published mitigations (docs/mitigations.md), composed with the blocks
    ("pre-ln", {"attn": "softpick"}),
    ("pre-ln", {"attn": "softmax1", "attn_bias_kv": True}),
    ("op", {"attn": "clipped", "attn_gate": "elem"}),
    ("op", {"attn_gate": "head", "attn_bias_kv": True, "pos_encoding": "rotary"}),
    ("pre-srms", {"norm": "ssnorm", "embed_proj": True}),
]


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS)
def test_causal(preset, overrides):
    model = tiny(preset, **overrides)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 64)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-6  # every later position sees it


def norms(model: GPT) -> dict[str, list[str]]:
    return {
        name: type(m).__name__
        for name, m in model.named_modules()
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm))
    }


def test_norm_modules_per_preset():
    L = TINY["n_layer"]
    blocks = [f"blocks.{i}.{n}" for i in range(L) for n in ("attn_norm", "mlp_norm")]
    qk = [f"blocks.{i}.attn.{n}" for i in range(L) for n in ("q_norm", "k_norm")]
    expect = {
        "pre-ln": dict.fromkeys([*blocks, "final_norm"], "LayerNorm"),
        "post-ln": dict.fromkeys(blocks, "LayerNorm"),
        "pre-rms": dict.fromkeys([*blocks, "final_norm"], "RMSNorm"),
        "pre-srms": dict.fromkeys([*blocks, "final_norm"], "SRMSNorm"),
        "op": {"blocks.0.attn_norm": "LayerNorm", "final_norm": "LayerNorm"}
        | dict.fromkeys(qk, "RMSNorm"),
        "op-nofinal": {"blocks.0.attn_norm": "LayerNorm"} | dict.fromkeys(qk, "RMSNorm"),
    }
    for preset in PRESETS:
        model = tiny(preset)
        assert norms(model) == expect[preset], preset
    srms = [m for m in tiny("pre-srms").modules() if isinstance(m, SRMSNorm)]
    assert all(not list(m.parameters()) for m in srms)  # no trainable weights
    gains = [m.weight.shape for n, m in tiny("op").named_modules() if n.endswith("q_norm")]
    assert gains == [torch.Size([TINY["d_model"] // TINY["n_head"]])] * TINY["n_layer"]


@pytest.mark.parametrize(
    ("preset", "overrides"),
    [
        ("op", {"beta": 0.37}),
        ("pre-ln", {"beta": 0.5}),
        ("op", {"beta_trainable": True}),
        ("post-ln", {"beta": "auto"}),
    ],
)
def test_beta_scales_branch_outputs(preset, overrides):
    model = tiny(preset, **overrides)
    beta = model.config.beta_value
    if model.config.beta_trainable:  # trainable β may be moved; forward must use the new value
        beta = 0.3
        for b in model.blocks:
            b.beta_attn.data.fill_(beta)
            b.beta_mlp.data.fill_(beta)
    seen: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, inputs, output):
            seen[name + ".in"], seen[name + ".out"] = inputs[0], output

        return hook

    block = model.blocks[1]
    for name in ("attn", "mlp", "attn_norm", "mlp_norm"):
        getattr(block, name).register_forward_hook(keep(name))
    block.register_forward_hook(keep("block"))
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 16)))
    x, out = seen["block.in"], seen["block.out"]
    a, m = seen["attn.out"], seen["mlp.out"]
    if preset == "post-ln":
        torch.testing.assert_close(seen["attn_norm.in"], x + beta * a)
        torch.testing.assert_close(seen["mlp_norm.in"], seen["mlp.in"] + beta * m)
    else:
        torch.testing.assert_close(seen["mlp_norm.in"], x + beta * a)
        torch.testing.assert_close(out, x + beta * a + beta * m)
    assert a.abs().max() > 1e-3 and m.abs().max() > 1e-3  # the check is not vacuous


def test_qk_norm_bounds_attention_logits():
    """|q̂·k̂|/√d_h ≤ ‖q̂‖‖k̂‖/√d_h ≤ (√d_h·max|g_q|)(√d_h·max|g_k|)/√d_h = √d_h·max|g_q|·max|g_k|,
    since ‖q/rms(q)‖ = √d_h; equality when q = k and the gains are constant."""
    model = tiny("op")
    attn = model.blocks[1].attn
    d_h = attn.d_head
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        attn.qkv.weight.mul_(50)  # large raw logits: the norm must still bound them
        attn.q_norm.weight.copy_(torch.empty(d_h).uniform_(-3, 3, generator=gen))
        attn.k_norm.weight.copy_(torch.empty(d_h).uniform_(-2, 2, generator=gen))
        x = torch.randn(2, 16, TINY["d_model"], generator=gen)
        logits = attn.attention_logits(x)
    bound = math.sqrt(d_h) * attn.q_norm.weight.abs().max() * attn.k_norm.weight.abs().max()
    assert logits.abs().max() <= bound * (1 + 1e-5)
    # tight: q = k and constant gains put √d_h·g_q·g_k on the diagonal
    C = TINY["d_model"]
    with torch.no_grad():
        attn.qkv.weight[C : 2 * C] = attn.qkv.weight[:C]
        attn.q_norm.weight.fill_(1.5)
        attn.k_norm.weight.fill_(-2.0)
        diag = attn.attention_logits(x).diagonal(dim1=-2, dim2=-1)
    torch.testing.assert_close(diag, torch.full_like(diag, -math.sqrt(d_h) * 3.0))


def test_softcap_bounds_attention_logits_and_matches_sdpa_when_loose():
    capped = tiny("pre-ln", logit_softcap=5.0)
    attn = capped.blocks[0].attn
    with torch.no_grad():
        attn.qkv.weight.mul_(30)
        x = torch.randn(2, 16, TINY["d_model"])
        logits = attn.attention_logits(x)
        attn.softcap = None
        raw = attn.attention_logits(x)
    assert raw.abs().max() > 20  # the cap is active
    assert logits.abs().max() <= 5.0  # tanh saturates to exactly 1 in float32
    torch.testing.assert_close(logits, 5.0 * torch.tanh(raw / 5.0))
    # with a cap far above the logits, the explicit path equals the SDPA path
    loose = tiny("pre-ln", logit_softcap=1e6)
    plain = tiny("pre-ln")
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loose(idx), plain(idx), rtol=1e-4, atol=1e-5)


def _init_kurtosis(preset: str, **overrides) -> dict[str, float]:
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset(preset, **overrides)).eval()  # the default (6 × 192) size
    acts: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=name: acts.__setitem__(n, o))
        for name, m in model.residual_points().items()
    ]
    with torch.no_grad():
        model(torch.randint(0, 256, (8, 128)))
    for h in hooks:
        h.remove()
    assert list(acts) == ["embed.resid_post"] + [f"blocks.{i}.resid_post" for i in range(6)]
    return {name: kurtosis(x) for name, x in acts.items()}


@pytest.mark.parametrize("preset", PRESETS)
def test_kurtosis_near_one_at_init(preset):
    for name, k in _init_kurtosis(preset, activation="gelu").items():
        assert 1.0 <= k < 1.2, (preset, name)  # science §1: ≈ 1 at init


@pytest.mark.parametrize("preset", PRESETS)
def test_relu_pre_norm_blocks_add_a_neuron_offset_at_init(preset):
    """With ReLU (every preset's activation), E[relu(h)] > 0, so each Pre-Norm MLP adds a
    fixed random vector W2·E[relu(h)] to every token: neuron RMSs spread and Eq. 1's Kurt
    grows with depth at init (1.0 → 1.9 over 6 blocks). Post-LN renormalises and OP's β = 0.2
    shrinks the offset 25×: those stay ≈ 1."""
    k = list(_init_kurtosis(preset).values())
    assert 1.0 <= k[0] < 1.02  # the embedding
    if preset.startswith("pre-"):
        assert 1.2 < k[1] < k[-1] < 2.0, k  # grows block by block
    else:
        assert max(k) < 1.02, k


def test_residual_points_are_embedding_and_block_outputs():
    model = tiny("pre-ln")
    acts = {}
    for name, m in model.residual_points().items():
        m.register_forward_hook(lambda mod, i, o, n=name: acts.__setitem__(n, o))
    seen = {}
    model.final_norm.register_forward_hook(lambda mod, i, o: seen.__setitem__("x", i[0]))
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        model(idx)
        emb = model.tok_emb(idx) + model.pos_emb.weight[:16]
    torch.testing.assert_close(acts["embed.resid_post"], emb)
    assert acts["blocks.1.resid_post"] is seen["x"]  # before the final norm


def test_loss_ignores_minus_100_and_checks_length():
    model = tiny("pre-ln")
    idx = torch.randint(0, 64, (2, 16))
    targets = idx.clone()
    targets[:, 8:] = -100
    logits, loss = model(idx, targets)
    ref = nn.functional.cross_entropy(logits[:, :8].reshape(-1, 64), idx[:, :8].reshape(-1))
    torch.testing.assert_close(loss, ref)
    with pytest.raises(ValueError, match="seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    tiny("op", pos_encoding="rotary")(torch.zeros(1, 40, dtype=torch.long))  # RoPE: any length


def test_param_groups_and_counts():
    model = tiny("op", beta_trainable=True, bias=True)
    decay, no_decay = model.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = sorted(names[id(p)] for p in decay["params"])
    linears = sorted(
        f"{n}.weight"
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n != "lm_head"
    )
    assert decayed == linears  # no norms, biases, gains, β, embeddings, tied head
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(names[id(p)].endswith("beta_attn") for p in no_decay["params"])
    torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)  # a valid optimizer spec

    model = tiny("pre-ln")
    V, T, d, L = 64, 16, 32, 2
    per_block = 12 * d * d + 2 * d  # qkv, proj, fc, proj + two LN gains
    n_all = V * d + T * d + L * per_block + d  # tied head counted once, final LN
    assert model.num_params(non_embedding=False) == n_all
    assert model.num_params() == n_all - T * d
    assert model.flops_per_token() == 6 * (n_all - T * d) + 12 * L * d * T
    untied = tiny("pre-ln", tie_embeddings=False)
    assert untied.num_params() == n_all - T * d  # the head counts, the input table does not


def test_save_load_round_trip(tmp_path):
    model = tiny("op", beta_trainable=True)
    with torch.no_grad():
        model.blocks[0].beta_mlp.fill_(0.7)
    model.save(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "model.safetensors",
        "model_config.json",
    ]
    loaded = GPT.load(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    assert loaded.lm_head.weight is loaded.tok_emb.weight  # still tied
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), loaded(idx))


def _rewrite_config(folder, **changes):
    import json

    path = folder / "model_config.json"
    meta = json.loads(path.read_text())
    meta.pop("weights_sha256", None)
    meta["config"].update(changes)
    path.write_text(json.dumps(meta))


def _one_line_error(folder, match):
    with pytest.raises(ModelLoadError, match=match) as info:
        GPT.load(folder)
    assert "\n" not in str(info.value)


def test_load_errors(tmp_path):
    folder = tmp_path / "m"
    tiny("pre-ln").save(folder)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF  # flip one weight byte
    weights.write_bytes(bytes(data))
    _one_line_error(folder, "checksum does not match")

    weights.write_bytes(bytes(data[:200]))  # truncated, and no checksum to catch it
    _rewrite_config(folder)
    _one_line_error(folder, "cannot load")

    tiny("pre-ln").save(folder)
    _rewrite_config(folder, d_mlp=64)  # the file's MLP is 4·32 = 128 wide
    _one_line_error(folder, "size mismatch")

    tiny("pre-ln", qk_norm=True).save(folder)
    _rewrite_config(folder, qk_norm=False)
    _one_line_error(folder, "unexpected.*q_norm")

    tiny("pre-ln").save(folder)
    _rewrite_config(folder, final_norm=False, norm="rmsnorm")
    _one_line_error(folder, "missing|unexpected")

    _rewrite_config(folder, n_layers=3)
    _one_line_error(folder, "model_config.json: unknown model field 'n_layers'")

    weights.unlink()
    _one_line_error(folder, "model.safetensors: missing")
    _one_line_error(tmp_path / "nowhere", "model_config.json: missing")


@pytest.mark.parametrize(("preset", "overrides"), VARIANTS)
def test_a_few_adamw_steps_reduce_the_loss(preset, overrides):
    model = tiny(preset, **overrides).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 64, (4, 16), generator=gen)
    y = torch.roll(x, -1, dims=1)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2)
    losses = []
    for _ in range(20):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters())  # DDP: no unused params
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


@pytest.mark.parametrize("overrides", [{}, {"logit_softcap": 30.0}])
def test_dropout_only_in_training(overrides):
    model = tiny("op", dropout=0.2, **overrides)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx), model(idx))  # eval: deterministic
        model.train()
        assert not torch.equal(model(idx), model(idx))


def test_rotary_logits_depend_on_relative_position_only():
    attn = tiny("op", pos_encoding="rotary").blocks[1].attn
    x = torch.randn(1, 1, TINY["d_model"]).expand(1, 16, -1)  # the same input everywhere
    with torch.no_grad():
        logits = attn.attention_logits(x)[0, 0]  # (T, T)
    for offset in (0, -3, 5):
        diag = logits.diagonal(offset)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-5)
    assert (logits.diagonal(0)[0] - logits.diagonal(-3)[0]).abs() > 1e-4  # positions matter


def test_load_checks_shapes_before_allocating(tmp_path):
    """A tampered model_config.json asking for ~100 GB fails fast, naming a tensor, before the
    model is built (issue 16 item 7): shapes come from the safetensors header."""
    import resource
    import time

    folder = tmp_path / "m"
    tiny("pre-ln").save(folder)
    _rewrite_config(folder, d_model=32768, n_head=2, d_mlp=4 * 32768, n_layer=2)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    match = r"size mismatch for tensor \w+\.weight: the file has \[\d+, 32\], model_config"
    with pytest.raises(ModelLoadError, match=match) as info:
        GPT.load(folder)
    assert time.perf_counter() - start < 5.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < 512 * 1024
    assert "model_config.json asks for [16, 32768]" in str(info.value)  # pos_emb: first in order
    assert "\n" not in str(info.value)
