"""Typed config values: the one-line checks every section config uses, and the conversion of a
TOML value or an override string to a field's type.

Every rejection is a :class:`~outlierlab.errors.ConfigError` in one style:
``optim.warmup=inf is not allowed; allowed: a finite number ≥ 0``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, Literal, Union

from outlierlab.errors import ConfigError


def bad(name: str, value: Any, allowed: str) -> ConfigError:
    """The one error style: the field, the bad value and what is allowed."""
    return ConfigError(f"{name}={value!r} is not allowed; allowed: {allowed}")


def unknown(name: str, allowed: Iterable[str]) -> ConfigError:
    """An unknown field, naming the close matches (or every allowed name)."""
    allowed = list(allowed)
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(allowed)}"
    return ConfigError(f"unknown field {name!r}; {hint}")


def choice(name: str, value: Any, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise bad(name, value, ", ".join(allowed))
    return value


def flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad(name, value, "true, false")
    return value


def number(
    name: str,
    value: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
    none: bool = False,
) -> Any:
    """``value`` if it is a finite number (an ``int`` when ``integer``) in the range, else a
    :class:`ConfigError` saying which range; ``None`` passes when ``none``. Floats come back as
    ``float``."""
    if value is None and none:
        return None
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    ok = ok and (isinstance(value, int) or math.isfinite(value))  # huge ints: no float
    ok = ok and (lo is None or (value > lo if lo_open else value >= lo))
    ok = ok and (hi is None or (value < hi if hi_open else value <= hi))
    if not ok:
        raise bad(name, value, describe(lo, hi, lo_open, hi_open, integer, none))
    return value if integer else float(value)


def describe(lo=None, hi=None, lo_open=False, hi_open=False, integer=False, none=False) -> str:
    """``an integer ≥ 1``, ``a finite number in [0, 1)``, ``a finite number > 0 or null``."""
    what = "an integer" if integer else "a finite number"
    g = lambda x: str(x) if isinstance(x, int) else f"{x:g}"  # noqa: E731
    if lo is not None and hi is not None:
        rng = f" in {'(' if lo_open else '['}{g(lo)}, {g(hi)}{')' if hi_open else ']'}"
    elif lo is not None:
        rng = f" {'>' if lo_open else '≥'} {g(lo)}"
    elif hi is not None:
        rng = f" {'<' if hi_open else '≤'} {g(hi)}"
    else:
        rng = ""
    return what + rng + (" or null" if none else "")


def arg_type(**rule: Any) -> Callable[[str], Any]:
    """An argparse ``type=`` that parses a number and applies :func:`number`'s ``rule``, so a
    bad option value is argparse's one-line usage error (exit 2)."""
    tp = int if rule.get("integer") else float

    def parse(text: str) -> Any:
        try:
            return number("", coerce(text, tp, ""), **rule)
        except ConfigError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not allowed; allowed: {describe(**rule)}"
            ) from None

    return parse


# --------------------------------------------------------------------------- type conversion


def coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a TOML value or an override string to the field type ``tp`` (``int``, ``float``,
    ``bool``, ``str``, ``X | None``, ``tuple[...]``, ``list[...]``, ``Literal``). Ranges are the
    section configs' job."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return _union(value, typing.get_args(tp), name)
    if origin is Literal:
        return choice(name, value, [str(a) for a in typing.get_args(tp)])
    if origin in (tuple, list):
        return _sequence(value, tp, origin, name)
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower() if isinstance(value, str) else None
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise bad(name, value, "true, false")
    if tp is int:
        return _int(value, name)
    if tp is float:
        if isinstance(value, bool):
            raise bad(name, value, "a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad(name, value, "a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise bad(name, value, "a string")
        return str(value)
    return value


def _union(value: Any, args: tuple, name: str) -> Any:
    is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
    if is_none and type(None) in args:
        return None
    errors = []
    for a in args:
        if a is not type(None):
            try:
                return coerce(value, a, name)
            except ConfigError as exc:
                errors.append(exc)
    raise errors[0] if errors else bad(name, value, "null")


def _sequence(value: Any, tp: Any, origin: type, name: str) -> Any:
    if isinstance(value, str):
        items = [x.strip() for x in value.strip().strip("[]()").split(",") if x.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise bad(name, value, "a list like 0.9,0.95")
    args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [str]
    conv = [coerce(x, args[min(i, len(args) - 1)], name) for i, x in enumerate(items)]
    if origin is tuple and Ellipsis not in typing.get_args(tp) and len(conv) != len(args):
        raise bad(name, value, f"{len(args)} values")
    return origin(conv)


def _int(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.replace("_", ""))
        except ValueError:
            try:
                f = float(value)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
    raise bad(name, value, "an integer")


POSITIVE = arg_type(lo=1, integer=True)
"""argparse ``type=`` for counts (windows, batches, tokens): an integer ≥ 1."""


# --------------------------------------------------------------------------- roles of fields

IDENTITY = "identity"
"""Changes the maths: runs pair only when equal (science §5.2), and a resume may not change it
(the default role)."""
EXTENDABLE = "extendable"
"""Part of a run's identity, but a resume may change it (``train.steps``: extending a run)."""
RESUMABLE = "resumable"
"""Changes no computation (cadence, device, sinks, paths): a resume may change it and pairing
ignores it."""
SEED = "seed"
"""A seed: a configuration's runs differ in it (pairing pools them); fixed on resume."""
ROLES = (IDENTITY, EXTENDABLE, RESUMABLE, SEED)
_ROLE = "outlierlab.role"


def setting(default: Any, role: str = IDENTITY) -> Any:
    """A config dataclass field with ``default`` and its ``role`` (:data:`ROLES`) kept in the
    field's metadata: ``steps: int = setting(1000, EXTENDABLE)``."""
    assert role in ROLES, role
    return dataclasses.field(default=default, metadata={_ROLE: role})


def role_of(field: dataclasses.Field) -> str:
    """A dataclass field's role (:data:`IDENTITY` unless :func:`setting` said otherwise)."""
    return field.metadata.get(_ROLE, IDENTITY)


SECTIONS = ("model", "data", "optim", "train", "log")
"""The sections of a run config (``config.json``), in order."""


def flatten(table: dict[str, Any], where: str = "", prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}`` (nested tables too); a key given twice
    (``optim.lr`` nested and dotted) is a :class:`ConfigError` naming ``where``."""
    out: dict[str, Any] = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            inner = flatten(v, where, key + ".")
            twice = inner.keys() & out.keys()
        else:
            inner, twice = {key: v}, {key} & out.keys()
        if twice:
            raise ConfigError(f"{where or 'config'}: key {sorted(twice)[0]!r} given twice; "
                              "allowed: each key once")
        out.update(inner)
    return out


def preset_names(kind: str = "train") -> list[str]:
    """The presets shipped in ``outlierlab/presets/<kind>`` (``train`` or ``sweeps``)."""
    from importlib import resources

    folder = resources.files("outlierlab").joinpath("presets", kind)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))
