"""OutlierMonitor on small models of our own: points, every/enabled, masks, cleanup, results."""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import weakref

import pytest
import torch
from torch import nn

from outlierlab import OutlierMonitor
from outlierlab import metrics as M
from outlierlab.errors import ConfigError
from tolerances import F32_SUMS

D = 16


class Block(nn.Module):
    def __init__(self, out: str = "tensor"):
        super().__init__()
        self.mlp = nn.Linear(D, D)
        nn.init.normal_(self.mlp.weight, std=0.02)  # small residual branches, as at GPT init
        self.out = out

    def forward(self, x):
        y = x + self.mlp(x)
        if self.out == "tuple":
            return (y, None)
        if self.out == "dataclass":
            return Out(hidden=y, extra=1)
        return y


@dataclasses.dataclass
class Out:
    extra: int
    hidden: torch.Tensor


class Tiny(nn.Module):
    """Defines the residual_points() protocol; records its residual stream for comparison."""

    def __init__(self, n_layer=3, out="tensor", plant: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, D)
        self.blocks = nn.ModuleList(Block(out) for _ in range(n_layer))
        self.head = nn.Linear(D, 50)
        self.plant = plant
        self.seen: list[torch.Tensor] = []

    def residual_points(self):
        return {
            "embed.resid_post": self.emb,
            **{f"blocks.{i}.resid_post": b for i, b in enumerate(self.blocks)},
        }

    def forward(self, idx, attention_mask=None):
        x = self.emb(idx)
        if self.plant is not None:
            x = x.clone()
            x[..., self.plant] = x[..., self.plant] * 50
        self.seen = [x.detach()]
        for b in self.blocks:
            o = b(x)
            x = o[0] if isinstance(o, tuple) else (o.hidden if isinstance(o, Out) else o)
            self.seen.append(x.detach())
        return self.head(x)


def ids(b=4, t=12, seed=0):
    return torch.randint(0, 50, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("out", ["tensor", "tuple", "dataclass"])
def test_values_equal_metrics_of_the_same_activations(out):
    model = Tiny(out=out)
    with OutlierMonitor(model, mmr_max_tokens=None, cos_max_tokens=None) as mon:
        model(ids())
    res = mon.results()
    assert list(res) == [
        "embed.resid_post",
        "blocks.0.resid_post",
        "blocks.1.resid_post",
        "blocks.2.resid_post",
    ]
    for (name, r), x in zip(res.items(), model.seen):
        assert r["kurtosis"] == pytest.approx(M.kurtosis(x), rel=F32_SUMS), name
        assert r["mmr"] == pytest.approx(M.max_median_ratio(x), rel=1e-10), name
        assert r["cos_sim"] == pytest.approx(M.token_cosine_similarity(x, None), rel=1e-5, abs=1e-7)
        assert r["outlier_neurons"] == M.outlier_neurons(x)
        assert r["tokens"] == 48


def test_streams_over_forwards_and_flags_planted_neuron():
    model = Tiny(plant=5)
    seen = []
    with OutlierMonitor(model) as mon:
        for s in range(3):
            model(ids(seed=s))
            seen.append(model.seen[2])
    r = mon.results()["blocks.1.resid_post"]
    assert r["tokens"] == 3 * 48
    assert r["kurtosis"] == pytest.approx(M.kurtosis(torch.cat(seen)), rel=F32_SUMS)
    assert r["outlier_neurons"][0] == 5
    assert r["kurtosis"] > 5


def test_every_and_enabled():
    model = Tiny()
    with OutlierMonitor(model, every=3) as mon:
        for s in range(7):  # calls 0, 3, 6 are measured
            model(ids(seed=s))
    assert mon.results()["embed.resid_post"]["tokens"] == 3 * 48
    with OutlierMonitor(model) as mon:
        mon.enabled = False
        model(ids())
        assert mon.results() == {}
        mon.enabled = True
        model(ids())
        mon.reset()
        assert mon.results() == {}
        model(ids())
    assert mon.results()["blocks.0.resid_post"]["tokens"] == 48
    # submodules called outside a root forward are not measured
    with OutlierMonitor(model) as mon:
        model.blocks[0](torch.randn(2, 3, D))
    assert mon.results() == {}


def test_mask_excludes_padding_kwarg_positional_and_set_mask():
    model = Tiny()
    x = ids()
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[:, 8:] = 0
    with torch.no_grad():
        model(x)
    ref = M.kurtosis(model.seen[1][:, :8])
    for call in ("kwarg", "positional", "set_mask"):
        with OutlierMonitor(model) as mon:
            if call == "kwarg":
                model(x, attention_mask=mask)
            elif call == "positional":
                model(x, mask)
            else:
                mon.set_mask(mask.bool())
                model(x)
        r = mon.results()["blocks.0.resid_post"]
        assert r["tokens"] == 32, call
        assert r["kurtosis"] == pytest.approx(ref, rel=F32_SUMS), call
    with OutlierMonitor(model) as mon, pytest.raises(ConfigError, match="does not fit"):
        model(x, attention_mask=torch.ones(4, 5))


def hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_removed_on_exit_and_on_error():
    model = Tiny()
    assert hooks(model) == 0
    with OutlierMonitor(model):
        assert hooks(model) == 2 + 4
    assert hooks(model) == 0
    with pytest.raises(RuntimeError, match="boom"), OutlierMonitor(model):
        model(ids())
        raise RuntimeError("boom")
    assert hooks(model) == 0
    with pytest.raises(IndexError), OutlierMonitor(model):
        model(torch.full((1, 3), 99))  # error inside the forward
    assert hooks(model) == 0
    model(ids())  # and the model still works


def test_no_graph_or_activation_kept():
    model = Tiny()
    with OutlierMonitor(model) as mon:
        out = model(ids())
        ref = weakref.ref(out)
        out.sum().backward()
        del out
        gc.collect()
    assert ref() is None
    for acc in mon._acc.values():
        assert not acc.state.requires_grad and acc.state.numel() == 3 * D + 7


def test_globs_over_point_and_module_names():
    model = Tiny()
    with OutlierMonitor(model, points=["blocks.*.resid_post", "blocks.1.mlp"]) as mon:
        model(ids())
    assert list(mon.results()) == [f"blocks.{i}.resid_post" for i in range(3)] + ["blocks.1.mlp"]
    plain = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, D))
    with pytest.raises(ConfigError, match="Sequential has no block list"):
        OutlierMonitor(plain)
    with OutlierMonitor(plain, points="[02]") as mon:
        plain(torch.randn(5, 7, D))
    assert list(mon.results()) == ["0", "2"]
    with pytest.raises(ConfigError, match="match nothing"):
        OutlierMonitor(plain, points=["blocks.*"])


def test_bad_options():
    for kw in ({"every": 0}, {"cos_max_tokens": 1}, {"mmr_max_tokens": 0}, {"points": []}):
        with pytest.raises(ConfigError):
            OutlierMonitor(Tiny(), **kw)


def test_summary_and_json():
    model = Tiny(plant=3)
    with OutlierMonitor(model) as mon:
        model(ids())
    s = mon.summary()
    kurts = [v["kurtosis"] for v in mon.results().values()]
    assert s["kurtosis_max"] == max(kurts)
    assert s["kurtosis_mean"] == pytest.approx(sum(kurts) / len(kurts))
    data = json.loads(mon.to_json())
    assert [p["name"] for p in data["points"]] == list(mon.results())
    assert data["tokens"] == 48 and data["points"][1]["outlier_neurons"][0] == 3
    empty = OutlierMonitor(model)
    assert math.isnan(empty.summary()["kurtosis_mean"])
    assert json.loads(empty.to_json())["summary"]["kurtosis_max"] is None


def test_extras_and_bounded_subsamples():
    model = Tiny(plant=2)
    x = ids(b=8, t=40)  # 320 tokens
    with OutlierMonitor(model, extras=True, mmr_max_tokens=None, cos_max_tokens=None) as mon:
        model(x)
    r, act = mon.results()["blocks.0.resid_post"], model.seen[1]
    assert r["kurtosis_centred"] == pytest.approx(M.kurtosis_centred(act), rel=1e-9)
    assert r["token_excess_kurtosis"] == pytest.approx(M.token_excess_kurtosis(act), rel=1e-9)
    assert r["share_above_6"] == pytest.approx(M.share_above(act), rel=1e-12)
    with OutlierMonitor(model, mmr_max_tokens=50, cos_max_tokens=100, seed=1) as mon2:
        model(x)
    r2 = mon2.results()["blocks.0.resid_post"]
    assert "kurtosis_centred" not in r2
    assert r2["kurtosis"] == pytest.approx(r["kurtosis"], rel=F32_SUMS)  # always all tokens
    assert r2["mmr"] != r["mmr"] and r2["mmr"] == pytest.approx(r["mmr"], rel=0.2)
    assert r2["cos_sim"] != r["cos_sim"] and abs(r2["cos_sim"] - r["cos_sim"]) < 0.1


def test_glob_semantics():
    from outlierlab.monitor import glob_regex

    names = ["blocks.0", "blocks.0.mlp", "blocks.12", "blocks.12.mlp", "head"]

    def match(g):
        return [n for n in names if glob_regex(g).fullmatch(n)]

    assert match("blocks.*") == ["blocks.0", "blocks.12"]
    assert match("blocks.**") == ["blocks.0", "blocks.0.mlp", "blocks.12", "blocks.12.mlp"]
    assert match("**.mlp") == ["blocks.0.mlp", "blocks.12.mlp"]
    assert match("blocks.?") == ["blocks.0"]
    assert match("blocks.[!0]*") == ["blocks.12"]
    assert match("h?ad") == ["head"]
    with pytest.raises(ConfigError, match=r"'1\.blocks\.\*'"):
        OutlierMonitor(nn.Sequential(nn.Linear(2, 2), Holder()))


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))
