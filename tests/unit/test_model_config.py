"""GPTConfig: presets, (de)serialisation and one-line validation errors (science §2)."""

from __future__ import annotations

import math

import pytest

from outlierlab.errors import ConfigError
from outlierlab.model import PRESETS, GPTConfig


def test_presets_are_the_spec_set():
    assert GPTConfig.presets() == ["pre-ln", "post-ln", "pre-rms", "pre-srms", "op", "op-nofinal"]
    assert set(PRESETS) == set(GPTConfig.presets())


def test_op_preset_is_the_authors_op():
    c = GPTConfig.preset("op")
    assert (c.block, c.norm, c.first_attn_norm, c.final_norm) == ("op", "layernorm", True, True)
    assert (c.activation, c.qk_norm, c.beta_value, c.init_std) == ("relu", True, 0.2, 0.02)
    assert GPTConfig.preset("op-nofinal").final_norm is False


def test_round_trip_and_overrides():
    c = GPTConfig.preset("pre-rms", n_layer=3, beta="auto")
    d = c.to_dict()
    assert d["norm"] == "rmsnorm" and d["n_layer"] == 3 and d["beta"] == "auto"
    assert GPTConfig.from_dict(d) == c
    assert c.beta_value == pytest.approx(1 / math.sqrt(6))
    assert c.mlp_width == 4 * c.d_model and c.d_head == c.d_model // c.n_head


def test_auto_beta_is_about_the_authors_value_at_their_depths():
    for layers in (12, 18):
        assert 0.15 < GPTConfig(n_layer=layers, beta="auto").beta_value < 0.21


def test_unknown_key_names_it_and_lists_allowed():
    with pytest.raises(ConfigError, match=r"'nlayers'.*allowed: vocab_size, n_layer"):
        GPTConfig.from_dict({"nlayers": 3})
    with pytest.raises(ConfigError, match="allowed: pre-ln, post-ln"):
        GPTConfig.preset("pre-norm")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"d_model": 100, "n_head": 3}, "d_model=100 is not divisible by model.n_head=3"),
        ({"block": "sandwich"}, "block='sandwich'.*allowed: pre, post, op"),
        ({"norm": "batchnorm"}, "allowed: layernorm, rmsnorm, srmsnorm, ssnorm, none"),
        ({"activation": "tanh"}, "allowed: relu, gelu"),
        ({"pos_encoding": "alibi"}, "allowed: learned, rotary"),
        ({"beta": 0.0}, "beta=0.0.*'auto'"),
        ({"beta": -1}, "beta=-1"),
        ({"beta": "big"}, "beta"),
        ({"dropout": 1.0}, r"dropout=1.0.*\[0, 1\)"),
        ({"vocab_size": 0}, "vocab_size=0"),
        ({"n_layer": 2.5}, "n_layer=2.5"),
        ({"logit_softcap": 0}, "logit_softcap"),
        ({"block": "op"}, "needs entropy regulation.*allow_unregulated"),
        ({"qk_norm": "yes"}, "qk_norm='yes'"),
    ],
)
def test_invalid_fields_raise_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match) as info:
        GPTConfig(**overrides)
    assert "\n" not in str(info.value)


def test_op_entropy_regulation_options():
    GPTConfig(block="op", logit_softcap=30)
    GPTConfig(block="op", allow_unregulated=True)
    with pytest.raises(ConfigError):
        GPTConfig.preset("op", qk_norm=False)
    assert GPTConfig(beta="0.5").beta == 0.5  # numbers from text overrides are accepted
