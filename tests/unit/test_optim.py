"""Optimiser registry and lr schedules."""

from __future__ import annotations

import io
import math

import pytest
import torch

from outlierlab import optim
from outlierlab.errors import ConfigError
from outlierlab.model import GPT, GPTConfig
from outlierlab.optim import OptimConfig


@pytest.fixture
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=64, n_layer=1, d_model=16, n_head=2, seq_len=8))


@pytest.mark.parametrize(
    "name", ["adamw", "adafactor", "soap", "shampoo", "orthoadam", "muon", "sgd"]
)
def test_each_optimiser_steps_and_round_trips_state(model, name):
    opt = optim.build_optimizer(model, OptimConfig(name=name))
    x = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    again = optim.build_optimizer(model, OptimConfig(name=name))
    again.load_state_dict(torch.load(buf, weights_only=True))  # checkpoint contract
    assert len(again.param_groups) == len(opt.param_groups)
    assert all(g["initial_lr"] == g["lr"] for g in opt.param_groups)


def test_weight_decay_groups_follow_the_model(model):
    opt = optim.build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.3))
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert wd[id(model.tok_emb.weight)] == 0.0
    assert all(wd[id(p)] == (0.3 if p.ndim == 2 else 0.0) for p in model.blocks.parameters())
    assert sorted(set(wd.values())) == [0.0, 0.3]


def test_muon_takes_hidden_matrices_only(model):
    opt = optim.build_optimizer(model, OptimConfig(name="muon"))
    muon, aux = opt.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(aux, torch.optim.AdamW)
    in_muon = {id(p) for g in muon.param_groups for p in g["params"]}
    assert id(model.tok_emb.weight) not in in_muon  # embedding (= tied head) → AdamW
    assert all(p.ndim == 2 for g in muon.param_groups for p in g["params"])
    assert {g["lr"] for g in aux.param_groups} == {3e-3}
    n_all = len(list(model.parameters()))
    assert len(in_muon) + sum(len(g["params"]) for g in aux.param_groups) == n_all


def test_unknown_optimiser_lists_allowed():
    with pytest.raises(Exception, match="allowed: adafactor, adamw"):
        OptimConfig(name="adam")


def test_hyperparameters_are_one_list_the_registry_declares():
    import dataclasses

    from outlierlab.experiments.claims import OPTIMISER_FIELDS

    declared = {k for name in optim.names() for k in optim.defaults(name)}
    assert set(optim.hyperparameters()) == declared
    assert declared == {f.name for f in dataclasses.fields(OptimConfig) if f.default is None}
    assert set(OPTIMISER_FIELDS) == {"optim.name"} | {f"optim.{k}" for k in declared} - {
        "optim.lr", "optim.eps"}
    with pytest.raises(TypeError, match="momentun"):
        optim.register("typo", momentun=0.9)
    assert "typo" not in optim.REGISTRY


def test_hyperparameters_are_checked_and_unused_ones_dropped():
    cfg = OptimConfig(name="sgd", betas=(0.5, 0.5), lr=1)
    assert cfg.betas is None and cfg.eps is None and cfg.lr == 1.0 and cfg.momentum == 0.9
    for bad in ({"eps": math.inf}, {"lr": 0}, {"precondition_frequency": 2.5, "name": "soap"},
                {"betas": (0.9,)}, {"warmup": math.nan}):
        with pytest.raises(ConfigError, match="is not allowed; allowed: "):
            OptimConfig(**bad)


def test_schedules():
    f = optim.lr_factor
    assert [f(s, 100, "cosine", warmup=4) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, 100, "cosine", warmup=4) == 1.0
    assert math.isclose(f(52, 100, "cosine", warmup=4), 0.5)
    assert f(99, 100, "cosine", 4) > 0 and f(99, 100, "cosine", 4) < 1e-3
    assert math.isclose(f(52, 100, "linear", warmup=4, min_ratio=0.1), 0.1 + 0.9 * 0.5)
    assert f(79, 100, "wsd", warmup=4, decay_steps=20) == 1.0
    assert math.isclose(f(90, 100, "wsd", warmup=4, decay_steps=20), 0.5)
    assert f(99, 100, "constant", warmup=4) == 1.0
    cfg = OptimConfig(warmup=0.05)
    assert cfg.warmup_steps(1000) == 50 and OptimConfig(warmup=7).warmup_steps(1000) == 7


def test_set_lr_scales_each_groups_peak(model):
    opt = optim.build_optimizer(model, OptimConfig(name="muon", lr=0.02, aux_lr=1e-3))
    optim.set_lr(opt, 0.5)
    assert sorted({g["lr"] for g in opt.param_groups}) == [5e-4, 0.01]
