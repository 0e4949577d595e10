"""Grids made of parts (issue 25): the mitigations preset split in two keeps every run's name and
settings (so finished runs are reused), the baseline both parts hold is one run, and parts that
disagree are refused in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from outlierlab.errors import ConfigError
from outlierlab.experiments.grid import load_grid, parse_grid

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
PRESETS = Path(__file__).resolve().parents[2] / "src" / "outlierlab" / "presets" / "sweeps"


def _parse(path: Path):
    """The grid of a file, expanded but not checked point by point (load_grid does that, at
    about 0.1 s a point: once per test is enough)."""
    return parse_grid(tomllib.loads(path.read_text()), default_name=path.stem)


def _ids(grid) -> dict[str, str]:
    return {p.name: json.dumps(p.overrides, sort_keys=True) for p in grid.points}


def test_mitigations_parts_keep_the_51_run_presets_names_and_settings():
    """The union of mitigations-attn and mitigations-optim is the 51-run preset the leaderboard
    was measured with (tests/fixtures/mitigations-51.toml, as it was before the split): same
    names, same overrides, so a sweep over the old folder retrains nothing."""
    old = _parse(FIXTURES / "mitigations-51.toml")
    whole = load_grid("mitigations")  # checks every point of both parts
    attn, optim = (_parse(PRESETS / f"mitigations-{p}.toml") for p in ("attn", "optim"))
    assert len(old.points) == 51 and len(attn.points) == 24 and len(optim.points) == 30
    assert _ids(whole) == _ids(old)
    assert _ids(attn).items() <= _ids(old).items() and _ids(optim).items() <= _ids(old).items()
    shared = set(_ids(attn)) & set(_ids(optim))  # the baseline's 3 seeds, in both parts
    assert shared == {f"pre-ln-adamw-lr1e-2-eps1e-12-seed{s}" for s in range(3)}
    assert [p.name for p in whole.points] == [
        *(p.name for p in attn.points), *(p.name for p in optim.points if p.name not in shared)]
    for g in (attn, optim, whole):
        assert (g.preset, g.base, g.schemes, g.quant_args, g.measure_args, g.seeds) == (
            old.preset, old.base, old.schemes, old.quant_args, old.measure_args, old.seeds)
        assert g.folder == "mitigations" and (g.workers, g.threads) == (2, 1)
    assert whole.parts == ("mitigations-attn", "mitigations-optim") and whole.part_of is None
    assert (attn.manifest, optim.manifest, whole.manifest) == (
        "sweep-mitigations-attn.json", "sweep-mitigations-optim.json", "sweep.json")


PART = """name = "{name}"
preset = "tiny"
part_of = "{whole}"
{extra}
[base]
"train.steps" = 2
[[include]]
model = "pre-ln"
"train.seed" = [0]
[[include]]
model = "{model}"
{keys}
"train.seed" = [0]
[quant]
schemes = []
"""


def _part(tmp_path, name, model="op", keys="", extra="", whole="whole"):
    (tmp_path / f"{name}.toml").write_text(
        PART.format(name=name, model=model, keys=keys, extra=extra, whole=whole))


@pytest.mark.parametrize("b, whole_extra, match", [
    ({"extra": 'seeds = "test"'}, "", r"parts .*a\.toml and .*b\.toml differ in seeds"),
    ({"extra": 'own_lr_from = "t"'}, "",
     r"parts .*a\.toml and .*b\.toml differ in own_lr_from"),
    ({"whole": "other"}, "", r"part_of = 'other'; allowed: 'whole'"),
    ({}, '[base]\n"train.steps" = 3\n', r"base is not allowed beside parts"),
    ({}, 'parts2 = 1\n', r"parts2 is not allowed beside parts; allowed: description, name"),
])
def test_parts_that_disagree_are_refused_in_one_line(tmp_path, b, whole_extra, match):
    _part(tmp_path, "a", model="pre-ln", keys='"model.attn" = "softpick"')
    _part(tmp_path, "b", **b)
    (tmp_path / "whole.toml").write_text(f'parts = ["a.toml", "b.toml"]\n{whole_extra}')
    with pytest.raises(ConfigError, match=match) as exc:
        load_grid(tmp_path / "whole.toml")
    assert "\n" not in str(exc.value)


def test_one_run_under_two_names_in_two_parts_is_refused(tmp_path):
    """A part that declares its keys in another order names a shared run differently (and
    would train it twice): refused, naming both names."""
    def part(name, keys):
        (tmp_path / f"{name}.toml").write_text(
            f'name = "{name}"\npreset = "tiny"\npart_of = "whole"\n[base]\n"train.steps" = 2\n'
            f'[[include]]\nmodel = "pre-ln"\n{keys}\n"train.seed" = [0]\n[quant]\nschemes = []\n')

    part("a", '"model.attn" = "softpick"\n"model.attn_gate" = "head"')
    part("b", '"model.attn_gate" = "head"\n"model.attn" = "softpick"')
    (tmp_path / "whole.toml").write_text('parts = ["a.toml", "b.toml"]\n')
    names = [load_grid(tmp_path / f"{n}.toml").points[0].name for n in "ab"]
    assert names == ["pre-ln-attnsoftpick-attn_gatehead-seed0",
                     "pre-ln-attn_gatehead-attnsoftpick-seed0"]
    with pytest.raises(ConfigError, match=f"one run is named {names[0]} in one part and "
                                          f"{names[1]} in"):
        load_grid(tmp_path / "whole.toml")


def test_a_whole_keeps_its_parts_own_lr_from(tmp_path):
    _part(tmp_path, "a", model="pre-ln", keys='"model.attn" = "softpick"',
          extra='own_lr_from = "t"')
    _part(tmp_path, "b", extra='own_lr_from = "t"')
    (tmp_path / "whole.toml").write_text('parts = ["a.toml", "b.toml"]\n')
    assert load_grid(tmp_path / "whole.toml").own_lr_from == "t"
