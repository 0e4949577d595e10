"""OutlierAlert: fires once, names layer / step / value / neurons; flatten_results for loggers."""

from __future__ import annotations

import logging
import math

import pytest

from outlierlab.errors import ConfigError
from outlierlab.integrations import flatten_results
from outlierlab.integrations.alert import Alert, OutlierAlert, neuron_indices


def _results(kurts, neurons=None):
    return {
        f"blocks.{i}.resid_post": {
            "kurtosis": k,
            "mmr": 2.0 + i,
            "cos_sim": 0.1 * i,
            "outlier_neurons": (neurons or {}).get(i, []),
            "tokens": 64,
        }
        for i, k in enumerate(kurts)
    }


def test_clean_results_never_fire(caplog):
    alert = OutlierAlert(kurtosis_threshold=10.0)
    with caplog.at_level(logging.WARNING, logger="outlierlab"):
        for step in range(1, 50):
            assert alert.check(_results([1.0, 3.0, 9.99, 10.0]), step=step) is None
    assert alert.fired is None
    assert caplog.records == []


def test_fires_once_naming_worst_layer_step_value_and_neurons(caplog):
    alert = OutlierAlert(kurtosis_threshold=10.0, top_k=2)
    res = _results([1.1, 12.5, 40.0], neurons={2: [17, 3, 9]})
    with caplog.at_level(logging.WARNING, logger="outlierlab"):
        assert alert.check(_results([1.1, 1.2, 1.3]), step=10) is None
        fired = alert.check(res, step=20)
        assert alert.check(res, step=30) is None  # once per run
        assert alert.check(_results([99.0, 99.0, 99.0]), step=40) is None
    assert fired == Alert(
        step=20,
        point="blocks.2.resid_post",
        kurtosis=40.0,
        threshold=10.0,
        neurons=(17, 3),
        also=("blocks.1.resid_post",),
    )
    assert alert.fired is fired
    assert len(caplog.records) == 1
    msg = caplog.records[0].getMessage()
    assert caplog.records[0].levelno == logging.WARNING
    for part in ("step 20", "blocks.2.resid_post", "kurtosis 40", "> 10", "[17, 3]", "blocks.1"):
        assert part in msg


def test_reset_rearms(caplog):
    alert = OutlierAlert(kurtosis_threshold=5.0)
    assert alert.check(_results([6.0]), step=1) is not None
    alert.reset()
    assert alert.fired is None
    assert alert.check(_results([6.0]), step=2).step == 2


def test_nan_never_fires_inf_does():
    assert OutlierAlert().check(_results([math.nan]), step=1) is None
    assert OutlierAlert().check(_results([math.inf]), step=1).kurtosis == math.inf


@pytest.mark.parametrize("bad", [1.0, 0.5, -3, math.nan, math.inf, "10", True, None])
def test_bad_threshold_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="kurtosis_threshold"):
        OutlierAlert(kurtosis_threshold=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_top_k_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="top_k"):
        OutlierAlert(top_k=bad)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ([4, 1], (4, 1)),
        ([(4, 9.5), (1, 7.0)], (4, 1)),
        ([{"index": 4, "ratio": 9.5}, {"index": 1}], (4, 1)),
        ({"indices": [4, 1], "ratios": [9.5, 7.0]}, (4, 1)),
        ((), ()),
        (None, ()),
    ],
)
def test_neuron_indices_formats(value, expected):
    assert neuron_indices(value) == expected


def test_neuron_indices_from_tensor():
    torch = pytest.importorskip("torch")
    assert neuron_indices(torch.tensor([5, 2])) == (5, 2)


def test_flatten_results_keys_and_values():
    res = _results([1.5, 2.5])
    summary = {"kurtosis_mean": 2.0, "kurtosis_max": 2.5, "mmr_mean": 2.5, "cos_sim_mean": 0.05}
    flat = flatten_results(res, summary, prefix="of/")
    assert flat == {
        "of/kurtosis_mean": 2.0,
        "of/kurtosis_max": 2.5,
        "of/mmr_mean": 2.5,
        "of/cos_sim_mean": 0.05,
        "of/tokens": 64.0,
        "of/kurtosis/blocks.0.resid_post": 1.5,
        "of/kurtosis/blocks.1.resid_post": 2.5,
        "of/mmr/blocks.0.resid_post": 2.0,
        "of/mmr/blocks.1.resid_post": 3.0,
        "of/cos_sim/blocks.0.resid_post": 0.0,
        "of/cos_sim/blocks.1.resid_post": 0.1,
    }
    assert set(flatten_results(res, summary, per_layer=False)) == {
        "outliers/kurtosis_mean",
        "outliers/kurtosis_max",
        "outliers/mmr_mean",
        "outliers/cos_sim_mean",
        "outliers/tokens",
    }
