"""RunConfig: presets, TOML files, dotted overrides, round trips, resume checks."""

from __future__ import annotations

import json

import pytest

from outlierlab import config as C
from outlierlab.errors import ConfigError


def test_presets_load_and_validate():
    assert {"tiny", "default", "gpt2-130m"} <= set(C.preset_names())
    tiny = C.load("tiny")
    assert (tiny.model.n_layer, tiny.model.d_model) == (2, 32)
    big = C.load("gpt2-130m")
    assert (big.model.n_layer, big.model.d_model, big.train.batch_size) == (12, 768, 128)
    assert big.optim.betas == (0.9, 0.999) and big.optim.schedule == "linear"
    assert C.load().model.d_model == 192  # `default` unless named


def test_overrides_parse_by_field_type():
    cfg = C.load("tiny", overrides=[
        "model.n_layer=4", "optim.lr=1e-2", "optim.betas=0.8,0.9", "train.compile=true",
        "model.logit_softcap=30", "model.d_mlp=none", "out=runs/x",
    ])  # fmt: skip
    assert cfg.model.n_layer == 4 and isinstance(cfg.model.n_layer, int)
    assert cfg.optim.lr == 1e-2 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.train.compile is True and cfg.model.logit_softcap == 30.0
    assert cfg.model.d_mlp is None and cfg.out == "runs/x"


def test_model_preset_keeps_training_preset_sizes():
    cfg = C.load("tiny", overrides=["model=op"])
    assert cfg.model.block == "op" and cfg.model.qk_norm
    assert (cfg.model.n_layer, cfg.model.d_model) == (2, 32)


def test_switching_optimiser_within_a_family_keeps_the_shared_hyperparameters():
    # issue 14: adamw ↔ soap and adafactor ↔ shampoo pair at identical lr, betas, ε, wd
    adamw = C.load("default").optim
    for name in ("soap", "adafactor", "shampoo"):
        o = C.load("default", overrides=[f"optim.name={name}"]).optim
        assert (o.lr, o.betas, o.eps, o.weight_decay, o.schedule, o.warmup) == (
            adamw.lr, adamw.betas, adamw.eps, adamw.weight_decay, adamw.schedule, adamw.warmup)
    soap = C.load("default", overrides=["optim.name=soap"]).optim
    assert (soap.lr, soap.betas, soap.precondition_frequency) == (3e-3, (0.9, 0.95), 10)
    assert C.load("default", overrides=["optim.name=soap", "optim.lr=1e-2"]).optim.lr == 1e-2
    back = C.load("default", overrides=["optim.name=soap", "optim.precondition_frequency=5",
                                        "optim.name=adamw"]).optim
    assert back.precondition_frequency is None and back.betas == (0.9, 0.95)


def test_switching_optimiser_family_takes_its_defaults():
    muon = C.load("default", overrides=["optim.name=muon"]).optim
    assert (muon.lr, muon.betas, muon.weight_decay) == (0.02, (0.9, 0.95), 0.01)
    sgd = C.load("default", overrides=["optim.name=sgd"]).optim
    assert sgd.betas is None and sgd.eps is None and sgd.momentum == 0.9  # unused → unset
    assert (sgd.lr, sgd.weight_decay) == (0.1, 0.0)  # not the preset's AdamW values


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.name=foo", "adafactor, adamw, muon, orthoadam, sgd, shampoo, soap"),
        ("model.n_head=7", "n_head"),
        ("train.steps=-1", "train.steps"),
        ("model.heads=7", "did you mean model.n_head"),
        ("optimizer.lr=1", "did you mean"),
        ("optim.lr=fast", "optim.lr"),
        ("train.steps=2.5", "integer"),
        ("optim.schedule=sawtooth", "cosine, linear, wsd, constant"),
        ("noequals", "field=value"),
    ],
)
def test_bad_overrides_raise_one_line(override, needle):
    with pytest.raises(ConfigError) as exc:
        C.load("tiny", overrides=[override])
    msg = str(exc.value)
    assert needle in msg and "\n" not in msg


def test_toml_file_on_top_of_preset(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('preset = "tiny"\nout = "runs/t"\n[model]\npreset = "op"\nn_layer = 3\n'
                 '[optim]\nname = "muon"\n')
    cfg = C.load(config_file=f)
    assert cfg.model.block == "op" and cfg.model.n_layer == 3 and cfg.model.d_model == 32
    assert cfg.optim.name == "muon" and cfg.optim.aux_lr == 3e-3 and cfg.out == "runs/t"
    f.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match=r"did you mean train\.steps"):
        C.load(config_file=f)


def test_round_trip_and_toml_dump(tmp_path):
    cfg = C.load("tiny", overrides=["model=op", "optim.name=soap"])
    d = json.loads(json.dumps(cfg.to_dict()))
    assert C.RunConfig.from_dict(d) == cfg
    f = tmp_path / "dump.toml"
    f.write_text(cfg.to_toml())
    assert C.load(config_file=f) == cfg


def test_maths_fields_and_resume_config(tmp_path):
    a = C.load("tiny")
    ok = C.load("tiny", overrides=["train.steps=999", "train.log_every=3", "out=elsewhere"])
    assert C.changed_maths_fields(a, ok) == []
    bad = C.load("tiny", overrides=["optim.eps=1e-6", "train.steps=999"])
    assert C.changed_maths_fields(a, bad) == ["optim.eps"]
    (tmp_path / "config.json").write_text(json.dumps(a.to_dict()))
    r = C.resume_config(tmp_path, ["train.steps=500"])
    assert r.train.steps == 500 and r.out == str(tmp_path) and r.model == a.model
    with pytest.raises(ConfigError, match="model= cannot change"):
        C.resume_config(tmp_path, ["model=op"])


def test_old_run_config_with_a_retired_unset_field_still_loads():
    d = C.load("tiny").to_dict()
    d["optim"]["beta2_decay"] = None  # what config.json held before the field was removed
    assert C.RunConfig.from_dict(d).optim == C.load("tiny").optim
    d["optim"]["beta2_decay"] = -0.8  # a value set for it is not silently dropped
    with pytest.raises(ConfigError, match="beta2_decay"):
        C.RunConfig.from_dict(d)


def test_field_roles_are_the_one_identity_list():
    """RESUMABLE and NOT_IDENTITY derive from the dataclass fields' roles and name only fields
    that exist; a seed is found by its role, not by its name."""
    from outlierlab import fields
    from outlierlab.config import NOT_IDENTITY, RESUMABLE, ROLES, SEEDS, role

    flat = C.RunConfig().flat()
    assert not (RESUMABLE | NOT_IDENTITY) - flat.keys()
    assert SEEDS == ("train.seed",) and role("train.seed") == fields.SEED
    assert {"train.steps", "train.log_every", "log.kurtosis_every", "out"} <= RESUMABLE
    assert "train.steps" not in NOT_IDENTITY  # extending changes what a run is
    assert "train.seed" not in RESUMABLE and "train.seed" in NOT_IDENTITY
    assert "optim.lr" not in RESUMABLE | NOT_IDENTITY and role("optim.lr") == fields.IDENTITY
    assert role("optim.beta2_decay") == fields.IDENTITY  # a retired field: identity
    assert set(ROLES.values()) <= set(fields.ROLES)


def test_identity_pairs_by_role_and_data(tmp_path):
    from outlierlab.experiments.results import load_run
    from outlierlab.run_folder import RunFolder
    from run_fixtures import write_run

    a = load_run(write_run(tmp_path / "a", seed=1))
    b = load_run(write_run(tmp_path / "b", seed=2, extra={"train.log_every": 5}))
    assert (a.seed, b.seed) == (1, 2) and a.identity() == b.identity()
    c = write_run(tmp_path / "c", seed=3)
    RunFolder(c).set_status("finished", 100, data_fingerprint={"files_hash": "other"})
    assert load_run(c).identity() != a.identity()  # other data: never paired
    d = load_run(write_run(tmp_path / "d", seed=1, extra={"train.steps": 200}))
    assert d.identity() != a.identity()


def test_flatten_refuses_a_key_given_twice():
    from outlierlab.fields import flatten

    assert flatten({"optim": {"lr": 1, "x": {"y": 2}}, "out": "o"}) == {
        "optim.lr": 1, "optim.x.y": 2, "out": "o"}
    with pytest.raises(C.ConfigError, match=r"'optim\.lr' given twice"):
        flatten({"optim.lr": 1, "optim": {"lr": 2}}, "base")
