"""Sweep grids: a TOML file that expands to a list of ``outlierlab train`` runs.

```toml
name = "quick"                   # default output folder name (runs/<name>)
preset = "tiny"                  # optional training preset: `outlierlab train --preset tiny`
workers = 2                      # optional defaults of --workers and --threads
threads = 1
seeds = "test"                   # optional pre-registration: "test" (seeds 0-2 only) or
                                 # "tuning" (seeds >= 100 only), checked on every point
own_lr_from = "quick-tuning"     # optional: each configuration runs at its own lr, chosen by
                                 # that tuning sweep; the claims pair across lrs
tuning = "healthy-lr"            # optional (not beside own_lr_from): the shipped lr choice
                                 # (presets/tuning/<name>.json) the report also tests the claims
                                 # at: at its shared lr and at each configuration's own lr
[base]                           # overrides every run gets
"train.steps" = 400
[grid]                           # cartesian product; a list holds the alternatives
model = ["pre-ln", "op"]
"optim.name" = ["adamw", "soap"]
[[include]]                      # extra points (a sub-grid: lists are alternatives again)
model = "post-ln"
[[exclude]]                      # drop every point matching all of these
model = "op"
"optim.name" = "adamw"
[quant]
schemes = ["w8a8-tensor", "w8a8-dynamic"]
args = ["--calib-batches", "8"]  # optional: more `outlierlab quantize` options for every run
[measure]                        # optional: `outlierlab measure RUN --save` after quantising
args = ["--max-tokens", "8192"]  # (RUN/measure.json: max|x|/median, attention sinks)
```

Keys are the dotted override names of ``outlierlab train``; quote them (``"optim.lr"``) or
nest tables, both work. A list-valued field is given as a list of lists in ``[grid]``.
Points with the same effective overrides are trained once. :func:`load_grid` resolves every
point with the code ``outlierlab train`` uses (:func:`check_grid`), so a bad field, model, value
or scheme is an error naming the point before anything runs. Each point's run folder is named
from the values of the *declared* keys (those in ``[grid]`` and ``[[include]]``), in the order
they first appear (seeds last), e.g. ``op-soap-lr1e-2-seed0``; the name does not depend on
which other points exist, so adding values to an axis never renames finished runs.

**Parts** (issue 25): a grid too long for one sitting is split into grids that each say
``part_of = "<whole>"``, and a whole grid is ``parts = ["part-a", "part-b"]`` (presets, or
``.toml`` files beside it) with nothing else but ``name``, ``description``, ``workers`` and
``threads``: :func:`union` runs the parts' points in order, a point two parts share (each
part's own copy of the baseline) once. A point keeps the name its part gives it, so running the
parts one by one, or the whole, trains and reuses the same run folders; a part's default
folder is its whole's (:attr:`Grid.folder`).

**Pre-registration** (issue 23, docs/reproduce.md "How settings are chosen"): ``seeds`` says
what a sweep is for. ``"tuning"`` sweeps choose settings and may use only seeds ≥
:data:`TUNING_MIN` (100, 101, ...); ``"test"`` sweeps give the verdicts and may use only the test
seeds :data:`TEST_SEEDS` (0, 1, 2), which never feed a choice. :func:`check_grid` checks every
point's resolved ``train.seed``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from outlierlab import config
from outlierlab.errors import ConfigError
from outlierlab.fields import bad, flatten, preset_names
from outlierlab.quant.config import SCHEMES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_SCHEMES: tuple[str, ...] = ("w8a8-tensor", "w8a8-dynamic")
TOP_KEYS = {"name", "description", "preset", "workers", "threads", "seeds", "base", "grid",
            "include", "exclude", "quant", "measure", "part_of", "own_lr_from", "tuning"}
PARTS_KEYS = {"name", "description", "workers", "threads", "parts"}
"""The keys of a grid made of parts (``parts = [...]``): the rest comes from the parts."""
TEST_SEEDS = (0, 1, 2)
"""The seeds verdicts are computed on (``seeds = "test"``); no setting is chosen on them."""
TUNING_MIN = 100
"""Settings are chosen on seeds ≥ this (``seeds = "tuning"``)."""
SEED_ROLES = ("test", "tuning")
# Name parts: the value alone for these keys (their values are self-describing names) ...
VALUE_ONLY = {"model", "optim.name", "model.block", "model.norm", "model.activation",
              "data.tokenizer", "data.source", "optim.schedule"}
# ... and a short prefix for these (the last dotted component otherwise).
ABBREV = {"n_layer": "L", "d_model": "d", "n_head": "h", "weight_decay": "wd",
          "batch_size": "bs", "seq_len": "T", "steps": "steps", "warmup": "wu"}
MAX_NAME = 96
MAX_POINTS = 4096
"""The most points one grid may expand to (a typo such as a 10⁶-point grid is refused at once)."""


@dataclass(frozen=True)
class GridPoint:
    """One run of a sweep: its folder name and its ``field=value`` overrides."""

    name: str
    overrides: dict[str, Any]

    def args(self) -> list[str]:
        """The overrides as ``outlierlab train`` arguments, e.g. ``["optim.lr=0.01"]``."""
        return [f"{k}={format_value(v)}" for k, v in self.overrides.items()]


@dataclass
class Grid:
    """A parsed sweep file (see the module docstring)."""

    name: str
    points: list[GridPoint]
    preset: str | None = None
    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    quant_args: tuple[str, ...] = ()
    """Extra ``outlierlab quantize`` options for every run (``quant.args``)."""
    workers: int | None = None
    """Default of ``--workers`` (runs at once)."""
    threads: int | None = None
    """Default of ``--threads`` (torch threads per run)."""
    description: str = ""
    base: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    seeds: str | None = None
    """``"test"`` or ``"tuning"`` (pre-registration, module docstring); None: not declared."""
    measure_args: tuple[str, ...] | None = None
    """``outlierlab measure RUN --save`` options run after quantisation (``[measure] args``);
    None: the grid has no ``[measure]`` table and no run is measured."""
    parts: tuple[str, ...] = ()
    """The grids this one is the union of (``parts = [...]``), in the order they run."""
    part_of: str | None = None
    """The grid this one is a part of (``part_of = "..."``): it shares that grid's folder."""
    own_lr_from: str | None = None
    """The tuning sweep that chose each configuration's own lr (``own_lr_from = "..."``): the
    points run at those lrs, and the report's claims pair configurations across lrs (the lr
    taken out of the pairing, as for a tuning's own-lr claims); None: claims pair equal lrs."""
    tuning: str | None = None
    """A shipped lr choice (``tuning = "..."``, ``presets/tuning/<name>.json``, a tuning sweep's
    frozen ``tuning.json``): the report also tests the claims at its shared lr and at each
    configuration's own lr (:func:`~outlierlab.experiments.report.lr_claim_sets`)."""

    @property
    def folder(self) -> str:
        """Default sweep folder name (``runs/<folder>``): a part's is its whole's, so the parts
        share their runs (the baseline both hold is trained once) and one report covers all."""
        return self.part_of or self.name

    @property
    def manifest(self) -> str:
        """File name of the sweep manifest in the folder: ``sweep.json``, or
        ``sweep-<part>.json`` for a part (the parts share a folder)."""
        return f"sweep-{self.name}.json" if self.part_of else "sweep.json"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "preset": self.preset,
                "schemes": list(self.schemes), "quant_args": list(self.quant_args),
                "base": self.base, "source": self.source, "seeds": self.seeds,
                "measure_args": None if self.measure_args is None else list(self.measure_args),
                "parts": list(self.parts), "part_of": self.part_of,
                "own_lr_from": self.own_lr_from, "tuning": self.tuning,
                "points": [{"name": p.name, "overrides": p.overrides} for p in self.points]}


def format_value(v: Any) -> str:
    """A value as the train CLI reads it: true/false, numbers as Python prints them, lists
    as JSON."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def short_number(v: float | int) -> str:
    """Compact, exact-enough number for a folder name: 0.01 → 1e-2, 3e-4 → 3e-4, 0.5 → 0.5."""
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):  # refused by the config check; named, not crashed on, before
        return str(v)
    g = f"{v:.6g}"
    if "e" not in g and (v == 0 or abs(v) >= 0.1):
        return g
    mant, exp = f"{v:.6e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


def _part(key: str, value: Any) -> str:
    if isinstance(value, bool):
        last = key.rsplit(".", 1)[-1]
        return last if value else f"no-{last}"
    if isinstance(value, str) and key in VALUE_ONLY:
        return value
    last = key.rsplit(".", 1)[-1]
    prefix = ABBREV.get(last, last)
    if isinstance(value, (int, float)):
        return f"{prefix}{short_number(value)}"
    if isinstance(value, (list, tuple)):
        return prefix + "_".join(short_number(x) if isinstance(x, (int, float)) and
                                 not isinstance(x, bool) else str(x) for x in value)
    return f"{prefix}{value}"


def _safe(name: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("._-")
    return name or "run"


def point_name(overrides: dict[str, Any], keys: list[str]) -> str:
    """Folder name of a point: the values of ``keys`` it sets, joined by ``-``."""
    parts = [_part(k, overrides[k]) for k in keys if k in overrides]
    return _safe("-".join(parts)) if parts else "base"


def _ident(overrides: dict[str, Any]) -> str:
    """The canonical text of a point's overrides: equal for the same run, whatever the order."""
    return json.dumps(overrides, sort_keys=True, default=str)


def _digest(overrides: dict[str, Any]) -> str:
    return hashlib.sha1(_ident(overrides).encode()).hexdigest()[:6]


def _alternatives(table: dict[str, Any], where: str) -> dict[str, list[Any]]:
    out = {}
    for k, v in flatten(table, where).items():
        vals = list(v) if isinstance(v, list) else [v]
        if not vals:
            raise ConfigError(f"{where}.{k} is an empty list; allowed: at least one value")
        out[k] = vals
    return out


def _product(axes: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(axes[k] for k in keys))]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not (
        isinstance(a, bool) or isinstance(b, bool)
    ):
        return float(a) == float(b)
    return a == b


def parse_grid(data: dict[str, Any], *, default_name: str = "sweep", source: str = "") -> Grid:
    """Expand a parsed TOML document into a :class:`Grid` (see the module docstring)."""
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise ConfigError(f"{source or 'grid'}: unknown key {sorted(unknown)[0]!r}; "
                          f"allowed: {', '.join(sorted(TOP_KEYS))}")
    for key in ("base", "grid", "quant"):
        if key in data and not isinstance(data[key], dict):
            raise ConfigError(f"{source or 'grid'}: [{key}] must be a table")
    for key in ("include", "exclude"):
        if key in data and not (isinstance(data[key], list)
                                and all(isinstance(t, dict) for t in data[key])):
            raise ConfigError(f"{source or 'grid'}: {key} must be an array of tables [[{key}]]")
    base = flatten(data.get("base", {}), "base")
    axes = _alternatives(data.get("grid", {}), "grid")
    includes = [_alternatives(t, f"include[{i}]") for i, t in enumerate(data.get("include", []))]
    excludes = [_alternatives(t, f"exclude[{i}]") for i, t in enumerate(data.get("exclude", []))]
    if "out" in base or "out" in axes or any("out" in t for t in includes):
        raise ConfigError("grid: 'out' is set by the sweep for each run; remove it")

    keys: list[str] = []
    for table in [axes, *includes]:
        keys += [k for k in table if k not in keys]
    keys.sort(key=lambda k: k.rsplit(".", 1)[-1] == "seed")  # seeds last, else as declared

    size = (math.prod(len(v) for v in axes.values()) if axes or not includes else 0) + sum(
        math.prod(len(v) for v in t.values()) for t in includes)
    if size > MAX_POINTS:
        raise ConfigError(f"{source or 'grid'}: {size:,} points; allowed: at most "
                          f"{MAX_POINTS:,} per sweep (split it into several grids)")
    raw = (_product(axes) if axes or not includes else []) + [
        p for t in includes for p in _product(t)]
    points: list[GridPoint] = []
    seen: dict[str, str] = {}
    used: set[str] = set()
    for specific in raw:
        eff = {**base, **specific}
        if any(all(any(_same(eff.get(k, object()), v) for v in vals) for k, vals in ex.items())
               for ex in excludes):
            continue
        ident = _ident(eff)
        if ident in seen:
            continue
        name = point_name(eff, keys)
        if len(name) > MAX_NAME or name in used:
            name = f"{name[:MAX_NAME - 7]}-{_digest(eff)}"
        seen[ident] = name
        used.add(name)
        points.append(GridPoint(name=name, overrides=eff))
    if not points:
        raise ConfigError(f"{source or 'grid'}: no runs left after [[exclude]]; allowed: ≥ 1 run")

    quant = dict(data.get("quant", {}))
    schemes = quant.pop("schemes", list(DEFAULT_SCHEMES))
    qargs = quant.pop("args", [])
    if quant:
        raise ConfigError(f"grid: unknown key quant.{sorted(quant)[0]}; allowed: quant.schemes, "
                          "quant.args")
    if not isinstance(schemes, list) or not all(isinstance(s, str) for s in schemes):
        raise ConfigError("grid: quant.schemes must be a list of scheme names (may be empty)")
    if not isinstance(qargs, list):
        raise ConfigError("grid: quant.args must be a list of `outlierlab quantize` options")
    measure_args = _measure_args(data.get("measure"))
    preset = data.get("preset")
    if preset is not None and not isinstance(preset, str):
        raise ConfigError("grid: preset must be a training preset name (a string)")
    for key in ("workers", "threads"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"grid: {key} = {v!r}; allowed: an integer ≥ 1")
    part_of = data.get("part_of")
    if part_of is not None and (not isinstance(part_of, str) or not part_of):
        raise ConfigError(f"{source or 'grid'}: part_of = {part_of!r}; allowed: the name of the "
                          "grid this one is a part of")
    own_lr_from = data.get("own_lr_from")
    if own_lr_from is not None and (not isinstance(own_lr_from, str) or not own_lr_from):
        raise ConfigError(f"{source or 'grid'}: own_lr_from = {own_lr_from!r}; allowed: the name "
                          "of the tuning sweep that chose the lrs")
    tuning = data.get("tuning")
    if tuning is not None:
        if not isinstance(tuning, str) or tuning not in shipped_tunings():
            raise ConfigError(f"{source or 'grid'}: tuning = {tuning!r}; allowed: a shipped lr "
                              f"choice ({', '.join(shipped_tunings()) or 'none shipped'})")
        if own_lr_from is not None:
            raise ConfigError(f"{source or 'grid'}: tuning and own_lr_from together; allowed: "
                              "one (own_lr_from pairs every claim across lrs; tuning tests them "
                              "at its shared lr and at each configuration's own lr)")
    seeds = data.get("seeds")
    if seeds is not None and seeds not in SEED_ROLES:
        raise ConfigError(f"{source or 'grid'}: seeds = {seeds!r}; allowed: \"test\" (seeds "
                          f"{', '.join(map(str, TEST_SEEDS))}) or \"tuning\" (seeds ≥ "
                          f"{TUNING_MIN})")
    return Grid(name=_safe(str(data.get("name", default_name))), points=points, preset=preset,
                schemes=tuple(schemes), quant_args=tuple(str(a) for a in qargs),
                workers=data.get("workers"), threads=data.get("threads"),
                description=str(data.get("description", "")),
                base=base, source=source, seeds=seeds, measure_args=measure_args,
                part_of=part_of, own_lr_from=own_lr_from, tuning=tuning)


def _measure_args(table: Any) -> tuple[str, ...] | None:
    """The ``[measure]`` table's ``args`` (options of ``outlierlab measure RUN --save``), or None
    when the grid has no such table."""
    if table is None:
        return None
    if not isinstance(table, dict) or set(table) - {"args"}:
        extra = sorted(set(table) - {"args"}) if isinstance(table, dict) else ["(not a table)"]
        raise ConfigError(f"grid: unknown key measure.{extra[0]}; allowed: measure.args")
    args = table.get("args", [])
    if not isinstance(args, list):
        raise ConfigError("grid: measure.args must be a list of `outlierlab measure` options")
    return tuple(str(a) for a in args)


def sweep_presets() -> list[str]:
    """Names of the sweep presets shipped in ``outlierlab/presets/sweeps``."""
    return preset_names("sweeps")


def check_grid(grid: Grid) -> None:
    """Resolve every point as its ``outlierlab train`` command will (training preset, then the
    point's overrides as command-line strings) and check the quantisation schemes; the first bad
    one is a ``ConfigError`` naming the point and the field."""
    for s in grid.schemes:
        if s not in SCHEMES:
            raise bad(f"{grid.source or 'grid'}: quant.schemes", s, ", ".join(SCHEMES))
    for p in grid.points:
        try:
            cfg = config.load(grid.preset, None, p.args())
        except ConfigError as exc:
            raise ConfigError(f"grid point {p.name}: {exc}") from None
        check_seed_role(grid, p.name, cfg.train.seed)
    check_quant_args(grid)
    if grid.measure_args is not None:
        from outlierlab.cli import parse_args_of

        parse_args_of("measure", ["RUN", "--save", *grid.measure_args],
                      f"{grid.source or 'grid'}: measure.args")


def check_seed_role(grid: Grid, point: str, seed: int) -> None:
    """A ``seeds = "test"`` grid uses only :data:`TEST_SEEDS`, a ``"tuning"`` one only seeds ≥
    :data:`TUNING_MIN`; else a ``ConfigError`` naming the point and the seed."""
    if grid.seeds == "test" and seed not in TEST_SEEDS:
        allowed = f"the test seeds {', '.join(map(str, TEST_SEEDS))}"
    elif grid.seeds == "tuning" and seed < TUNING_MIN:
        allowed = f"tuning seeds ≥ {TUNING_MIN} (the test seeds never choose a setting)"
    else:
        return
    raise ConfigError(f"grid point {point}: train.seed={seed} is not allowed in a "
                      f"seeds = \"{grid.seeds}\" sweep; allowed: {allowed}")


def check_quant_args(grid: Grid) -> None:
    """``quant.args`` parse as ``outlierlab quantize`` options and give a valid scheme with every
    one of ``quant.schemes`` (so no point trains only for its quantisation to fail)."""
    from outlierlab.cli import parse_args_of
    from outlierlab.commands.quantize import build_config

    where = f"{grid.source or 'grid'}: quant.args"
    args = parse_args_of("quantize", ["RUN", *grid.quant_args], where)
    for s in grid.schemes:
        args.scheme = s
        try:
            build_config(args)
        except ConfigError as exc:
            raise ConfigError(f"{where} with scheme {s}: {exc}") from None


def shipped_tunings() -> list[str]:
    """Names of the shipped lr choices (``presets/tuning/<name>.json``)."""
    folder = resources.files("outlierlab").joinpath("presets/tuning")
    if not folder.is_dir():
        return []
    return sorted(f.name.removesuffix(".json") for f in folder.iterdir()
                  if f.name.endswith(".json"))


def tuning_text(name: str) -> str:
    """The text of the shipped lr choice ``name`` (``presets/tuning/<name>.json``)."""
    if name not in shipped_tunings():
        raise ConfigError(f"unknown lr choice {name!r}; allowed: "
                          f"{', '.join(shipped_tunings()) or 'none shipped'}")
    return resources.files("outlierlab").joinpath(f"presets/tuning/{name}.json").read_text()


def load_grid(spec: str | Path) -> Grid:
    """Load a grid from a ``.toml`` path or a preset name (``quick``, ``cpu``, ``gpu-130m``) and
    check every point (:func:`check_grid`). A grid made of parts (``parts = [...]``) is their
    union (:func:`union`)."""
    path = Path(spec)
    here: Path | None = None
    if path.suffix == ".toml" or path.exists():
        if not path.exists():
            raise ConfigError(f"grid file {str(path)!r} not found; allowed: a .toml file or a "
                              f"preset ({', '.join(sweep_presets())})")
        data, default_name = config.read_toml(path, "grid file"), path.stem
        source, here = str(path), path.parent
    else:
        res = resources.files("outlierlab").joinpath(f"presets/sweeps/{spec}.toml")
        if not res.is_file():
            raise ConfigError(f"unknown sweep preset {str(spec)!r}; allowed: a .toml file or "
                              f"{', '.join(sweep_presets())}")
        data, default_name, source = tomllib.loads(res.read_text()), str(spec), f"preset:{spec}"
    if "parts" in data:
        return union(data, default_name=default_name, source=source, here=here)
    grid = parse_grid(data, default_name=default_name, source=source)
    check_grid(grid)
    return grid


def union(data: dict[str, Any], *, default_name: str, source: str,
          here: Path | None = None) -> Grid:
    """A grid made of parts: ``parts = ["a", "b.toml"]`` (presets, or files beside this one),
    each a grid that says ``part_of = "<this grid's name>"``. The points are the parts' in
    order, a point in several parts (the baseline each part holds) once; every point keeps the
    name its part gives it, so running the parts one by one or the whole reuses the same run
    folders. The parts must agree on everything but their points (training preset, [base],
    [quant], [measure], seeds): their runs are compared with each other."""
    where = source or "grid"
    extra = sorted(set(data) - PARTS_KEYS)
    if extra:
        raise ConfigError(f"{where}: {extra[0]} is not allowed beside parts; allowed: "
                          f"{', '.join(sorted(PARTS_KEYS))} (the rest is each part's)")
    refs = data["parts"]
    if not isinstance(refs, list) or not refs or not all(
            isinstance(r, str) and r for r in refs):
        raise ConfigError(f"{where}: parts = {refs!r}; allowed: a list of sweep presets or "
                          ".toml files")
    name = _safe(str(data.get("name", default_name)))
    parts = []
    for ref in refs:
        part = load_grid(here / ref if here is not None and ref.endswith(".toml") else ref)
        if part.parts:
            raise ConfigError(f"{where}: part {ref!r} is made of parts itself; allowed: a grid "
                              "of points")
        if part.part_of != name:
            raise ConfigError(f"{part.source}: part_of = {part.part_of!r}; allowed: {name!r} "
                              f"(it is a part of {where})")
        parts.append(part)
    first = parts[0]
    for part in parts[1:]:
        for attr, label in (("preset", "preset"), ("base", "[base]"),
                            ("schemes", "quant.schemes"), ("quant_args", "quant.args"),
                            ("measure_args", "[measure]"), ("seeds", "seeds"),
                            ("own_lr_from", "own_lr_from"), ("tuning", "tuning")):
            if getattr(part, attr) != getattr(first, attr):
                raise ConfigError(f"{where}: parts {first.source} and {part.source} differ in "
                                  f"{label}; allowed: the same in every part")
    points: list[GridPoint] = []
    names: dict[str, str] = {}
    idents: dict[str, str] = {}
    for part in parts:
        for pt in part.points:
            ident = _ident(pt.overrides)
            if pt.name in names:
                if names[pt.name] != ident:
                    raise ConfigError(f"{where}: run {pt.name} has different settings in two "
                                      "parts; allowed: one run per name")
                continue
            if ident in idents:
                raise ConfigError(f"{where}: one run is named {idents[ident]} in one part and "
                                  f"{pt.name} in {part.source}; allowed: the same name (declare "
                                  "the keys in the same order)")
            names[pt.name], idents[ident] = ident, pt.name
            points.append(pt)
    for key in ("workers", "threads"):
        v = data.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ConfigError(f"grid: {key} = {v!r}; allowed: an integer ≥ 1")
    return Grid(name=name, points=points, preset=first.preset, schemes=first.schemes,
                quant_args=first.quant_args, workers=data.get("workers", first.workers),
                threads=data.get("threads", first.threads),
                description=str(data.get("description", "")), base=first.base, source=source,
                seeds=first.seeds, measure_args=first.measure_args, parts=tuple(refs),
                own_lr_from=first.own_lr_from, tuning=first.tuning)
