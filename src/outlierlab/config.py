"""Run config: ``RunConfig`` = model + data + optim + train + log (+ ``out``), composed from
the section configs each module owns (``GPTConfig`` in :mod:`outlierlab.model.config`,
``DataConfig`` in :mod:`outlierlab.data.config`, ``OptimConfig`` in :mod:`outlierlab.optim`,
``TrainConfig``/``LogConfig`` in :mod:`outlierlab.train.config`); built from named presets, TOML
files and dotted ``field=value`` overrides (values typed by :func:`outlierlab.fields.coerce`).

Layers, each on top of the last: the training preset (``presets/train/NAME.toml``, ``default``
unless named) → a user TOML file → command-line overrides. In a TOML ``[model]`` table the key
``preset`` names a model preset (science §2); the override ``model=op`` changes it while keeping
the sizes the training preset set. Unset optimiser hyperparameters take the chosen optimiser's
defaults (:data:`outlierlab.optim.REGISTRY`, science §3) when the config is built.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import tomli_w

from outlierlab import fields
from outlierlab.data.config import DataConfig
from outlierlab.errors import ConfigError
from outlierlab.fields import SECTIONS, coerce, flatten, preset_names, unknown
from outlierlab.model.config import GPTConfig
from outlierlab.optim import OptimConfig, hyperparameters, kept_on_switch
from outlierlab.train.config import LogConfig, TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "ConfigError", "DataConfig", "GPTConfig", "LogConfig", "OptimConfig", "RunConfig",
    "TrainConfig", "apply_overrides", "changed_maths_fields", "load", "merge", "preset_names",
    "read_preset", "read_toml", "resume_config", "role",
]  # fmt: skip



def _roles() -> dict[str, str]:
    """``{"train.steps": "extendable", ...}``: every field's role (:data:`outlierlab.fields.ROLES`),
    from the section dataclasses' field metadata; ``out`` (a path) is resumable."""
    roles = {f"{s}.{f.name}": fields.role_of(f)
             for s, cls in SECTION_TYPES.items() for f in dataclasses.fields(cls)}
    return {**roles, "out": fields.RESUMABLE}


@dataclass
class RunConfig:
    """Everything a training run needs; ``to_dict`` is what ``config.json`` holds."""

    model: GPTConfig = field(default_factory=GPTConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    out: str = ""
    """Run folder; empty = runs/<block>-<optim>-<UTC time> chosen at start."""

    def __post_init__(self) -> None:
        if self.train.parallel == "fsdp":  # an optimiser that needs whole matrices: refused
            from outlierlab.train.fsdp import check_optimizer

            check_optimizer(self.optim.name)

    def to_dict(self) -> dict[str, Any]:
        d = {s: _asdict(getattr(self, s)) for s in SECTIONS}
        d["out"] = self.out
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Build from a :meth:`to_dict`-shaped dict (unknown keys raise ``ConfigError``);
        a ``model.preset`` key is applied under the other model fields."""
        return _build(d)

    def flat(self) -> dict[str, Any]:
        """``{"model.n_layer": 6, ..., "out": ...}``."""
        return flatten(self.to_dict())

    def to_toml(self) -> str:
        """The resolved config as TOML, which ``--config`` reads back (fields that are ``None``
        are left out: TOML has no null)."""
        d = self.to_dict()
        return tomli_w.dumps({k: _drop_none(v) if isinstance(v, dict) else v for k, v in d.items()})


def _drop_none(section: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in section.items() if v is not None}


def _asdict(obj: Any) -> dict[str, Any]:
    d = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    return json.loads(json.dumps(d))


SECTION_TYPES: dict[str, type] = {
    "model": GPTConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "log": LogConfig,
}


ROLES: dict[str, str] = _roles()
"""Every config field's role: the one list of what pairs runs and what a resume may change."""
RESUMABLE = frozenset(k for k, r in ROLES.items() if r in (fields.RESUMABLE, fields.EXTENDABLE))
"""Fields that may differ when a run is resumed; every other field changes the maths."""
NOT_IDENTITY = frozenset(k for k, r in ROLES.items() if r in (fields.RESUMABLE, fields.SEED))
"""Fields left out when runs are paired (science §5.2): seeds and what changes no computation."""
SEEDS = tuple(k for k, r in ROLES.items() if r == fields.SEED)
"""The seed fields (a configuration's runs differ in them)."""


def role(key: str) -> str:
    """The role of dotted config field ``key``; a field this version does not have (an older
    run's) counts as identity."""
    return ROLES.get(key, fields.IDENTITY)


def _fields(section: str) -> dict[str, Any]:
    cls = SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _table(raw: dict[str, Any], section: str) -> dict[str, Any]:
    """``raw[section]`` (a new empty one if absent), which must be a table of fields."""
    sec = raw.setdefault(section, {})
    if not isinstance(sec, dict):
        raise ConfigError(f"{section}={sec!r:.60} is not allowed; allowed: a table of {section} "
                          "fields")
    return sec


# Fields older versions wrote into config.json and this one no longer has: read (when unset)
# so old run folders still resume; any value set for them is still an error.
RETIRED: dict[str, tuple[str, ...]] = {"optim": ("beta2_decay",)}


def _build(raw: Any) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"a run config must be a table of sections, got {raw!r:.60}")
    for k in sorted(set(raw) - {*SECTIONS, "out"}):
        raise unknown(k, [*SECTIONS, "out"])
    raw = dict(raw)
    kw: dict[str, Any] = {}
    for s in SECTIONS:
        sec = dict(_table(raw, s))
        known = _fields(s)
        preset = sec.pop("preset", None) if s == "model" else None
        for k, v in list(sec.items()):
            if k in RETIRED.get(s, ()) and v is None:  # written unset by an older version
                del sec[k]
                continue
            if k not in known:
                raise unknown(f"{s}.{k}", [f"{s}.{f}" for f in known])
            sec[k] = coerce(v, known[k], f"{s}.{k}")
        if s == "model" and preset is not None:
            kw[s] = GPTConfig.preset(str(preset), **sec)
        else:
            kw[s] = SECTION_TYPES[s](**sec)
    out = raw.get("out", "")
    return RunConfig(**kw, out=str(out) if out is not None else "")


# --------------------------------------------------------------------------- presets and files


def read_preset(name: str) -> dict[str, Any]:
    folder = resources.files("outlierlab") / "presets" / "train"
    path = folder / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown training preset {name!r}; allowed: {', '.join(preset_names())}")
    return tomllib.loads(path.read_text())


def read_text(path: str | Path, what: str) -> str:
    """The text of a file the user named; a missing, unreadable, binary file or a folder is a
    one-line ``ConfigError`` calling it ``what`` (e.g. ``config file``)."""
    p = Path(path)
    try:
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {p} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {p} is a folder; allowed: a file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what} {p} is not a UTF-8 text file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {p} cannot be read ({exc.strerror or exc})") from None


def read_toml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """A TOML file as a dict (errors as :func:`read_text`, or not valid TOML)."""
    text = read_text(path, what)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what} {path} is not valid TOML ({exc})") from None


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge of raw dicts; ``top`` wins. When ``top`` switches ``optim.name``, the
    optimiser hyperparameters of ``base`` are dropped (the new optimiser's defaults apply),
    except those both optimisers share within one family (:func:`optim.kept_on_switch`: adamw →
    soap keeps lr, betas, ε, weight decay)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    old, new = out.get("optim"), top.get("optim")
    new_name = new.get("name") if isinstance(new, dict) else None
    if isinstance(old, dict) and new_name is not None and new_name != old.get("name", "adamw"):
        drop = set(hyperparameters()) - set(kept_on_switch(old.get("name", "adamw"), new_name))
        out["optim"] = {k: v for k, v in old.items() if k not in drop}
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k].update(v)
        else:
            out[k] = v
    return out


def parse_override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not field=value (e.g. optim.lr=3e-3)")
    key, value = text.split("=", 1)
    return key.strip(), value.strip()


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` (and ``model=PRESET``, ``out=DIR``) to a raw dict. Values
    are parsed by the field's type; unknown fields raise ``ConfigError`` naming close matches."""
    pairs = [parse_override(t) for t in overrides]
    names = [v for k, v in pairs if k == "optim.name"]
    raw = merge(raw, {"optim": {"name": names[-1]}} if names else {})
    for key, value in pairs:
        if key == "out":
            raw["out"] = value
            continue
        if key == "model":
            _table(raw, "model")["preset"] = value
            continue
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            all_names = ["out", "model", *(f"{s}.{f}" for s in SECTIONS for f in _fields(s))]
            raise unknown(key, all_names)
        known = _fields(section)
        if name not in known:
            raise unknown(key, [f"{section}.{f}" for f in known])
        _table(raw, section)[name] = coerce(value, known[name], key)
    return raw


def load(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: list[str] | None = None,
) -> RunConfig:
    """Preset (``default`` unless named, or the file's top-level ``preset`` key) → TOML file →
    overrides, validated into a :class:`RunConfig`."""
    file_raw = read_toml(config_file) if config_file else {}
    name = preset or file_raw.pop("preset", None) or "default"
    file_raw.pop("preset", None)
    raw = merge(read_preset(name), file_raw)
    raw = apply_overrides(raw, list(overrides or []))
    return _build(raw)


def changed_maths_fields(old: RunConfig, new: RunConfig) -> list[str]:
    """Dotted names of the fields that differ and change the maths (not in :data:`RESUMABLE`)."""
    a, b = old.flat(), new.flat()
    return [k for k in a if k not in RESUMABLE and a.get(k) != b.get(k)]


def resume_config(run_dir: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """The saved ``config.json`` of ``run_dir`` with ``overrides`` applied. Whether they change
    the maths is checked by the loop (against the tokenizer-resolved vocabulary)."""
    from outlierlab.run_folder import RunFolder

    run = RunFolder(run_dir)
    if not run.is_run:
        raise ConfigError(f"{run_dir} is not a run folder (no {run.config_file.name}) to "
                          "resume")
    pairs = [parse_override(t) for t in overrides or []]
    for key, _ in pairs:
        if key in ("model", "out"):
            raise ConfigError(f"{key}= cannot change on resume; the run folder fixes it")
    saved = run.config
    try:
        _build(saved)
    except ConfigError as exc:
        raise ConfigError(f"run config {run.config_file} is invalid: {exc}") from None
    raw = apply_overrides(saved, list(overrides or []))
    raw["out"] = str(run_dir)
    return _build(raw)
