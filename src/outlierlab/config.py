"""Run config: ``RunConfig`` = model + data + optim + train + log (+ ``out``), validated
dataclasses built from named presets, TOML files and dotted ``field=value`` overrides.

Layers, each on top of the last: the training preset (``presets/train/NAME.toml``, ``default``
unless named) → a user TOML file → command-line overrides. In a TOML ``[model]`` table the key
``preset`` names a model preset (SPEC §2); the override ``model=op`` changes it while keeping
the sizes the training preset set. Unset optimiser hyperparameters take the chosen optimiser's
defaults (:data:`outlierlab.optim.REGISTRY`, SPEC §3) when the config is built.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

from outlierlab.data import DataConfig
from outlierlab.errors import ConfigError
from outlierlab.model import GPTConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

SECTIONS = ("model", "data", "optim", "train", "log")

# Fields that may differ when a run is resumed; every other field changes the maths.
RESUMABLE = frozenset(
    {
        "out",
        "train.steps",
        "train.log_every",
        "train.eval_every",
        "train.eval_windows",
        "train.ckpt_every",
        "train.keep_ckpts",
        "train.device",
        "train.compile",
        "train.threads",
        "data.cache_dir",
    }
    | {f"log.{k}" for k in ("kurtosis_every", "tensorboard", "wandb", "wandb_project")}
)


def _positive(section: str, name: str, value: Any, minimum: float = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise ConfigError(
            f"{section}.{name}={value!r} is not allowed; allowed: a number ≥ {minimum}"
        )


@dataclass
class OptimConfig:
    """Optimiser, its hyperparameters and the lr schedule (SPEC §3).

    Hyperparameters left ``None`` take the optimiser's defaults (``outlierlab.optim``); those the
    chosen optimiser does not use are dropped (set to ``None``) so the resolved config shows
    exactly what ran.
    """

    name: str = "adamw"
    """adamw, adafactor, soap, shampoo, muon, sgd."""
    lr: float | None = None
    """Peak learning rate (muon: of the Muon part; see ``aux_lr``)."""
    betas: tuple[float, float] | None = None
    """Adam-style (β1, β2): adamw, soap, muon's AdamW part."""
    eps: float | None = None
    """ε: adamw/soap/muon-AdamW denominator, adafactor ε1, shampoo matrix ε."""
    weight_decay: float | None = None
    """Decoupled weight decay on the ≥2-D matmul weights (never norms, gains, β, embeddings)."""
    momentum: float | None = None
    """sgd, shampoo, muon momentum."""
    precondition_frequency: int | None = None
    """soap / shampoo: recompute the preconditioner every this many steps."""
    beta2_decay: float | None = None
    """adafactor's second-moment decay exponent."""
    aux_lr: float | None = None
    """muon: lr of the AdamW that trains embeddings, head, norms and gains."""
    schedule: str = "cosine"
    """cosine | linear | wsd | constant, after a linear warm-up."""
    warmup: float = 0.05
    """Warm-up length: a fraction of ``train.steps`` when < 1, else a number of steps."""
    min_lr_ratio: float = 0.0
    """Final lr as a fraction of the peak (cosine, linear, wsd)."""
    decay_frac: float = 0.2
    """wsd: fraction of the steps spent in the final linear decay."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""

    def __post_init__(self) -> None:
        from outlierlab import optim

        used = optim.defaults(self.name)  # validates the name, listing allowed ones
        for k, default in used.items():
            if getattr(self, k) is None:
                setattr(self, k, default)
        for k in _HYPER:
            if k not in used:
                setattr(self, k, None)
        if self.betas is not None:
            self.betas = tuple(float(b) for b in self.betas)
            if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
                raise ConfigError(f"optim.betas={self.betas!r}; allowed: two numbers in [0, 1)")
        for k in ("lr", "aux_lr"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ConfigError(f"optim.{k}={v!r} is not allowed; allowed: a number > 0")
        for k in ("weight_decay", "momentum", "eps"):
            v = getattr(self, k)
            if v is not None and not (isinstance(v, (int, float)) and v >= 0):
                raise ConfigError(f"optim.{k}={v!r} is not allowed; allowed: a number ≥ 0")
        if self.precondition_frequency is not None:
            _positive("optim", "precondition_frequency", self.precondition_frequency)
        from outlierlab.optim import SCHEDULES

        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"optim.schedule={self.schedule!r}; allowed: {', '.join(SCHEDULES)}"
            )
        _positive("optim", "warmup", self.warmup, 0)
        _positive("optim", "grad_clip", self.grad_clip, 0)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"optim.min_lr_ratio={self.min_lr_ratio!r}; allowed: [0, 1]")
        if not 0 <= self.decay_frac <= 1:
            raise ConfigError(f"optim.decay_frac={self.decay_frac!r}; allowed: [0, 1]")

    def warmup_steps(self, steps: int) -> int:
        return round(self.warmup * steps) if self.warmup < 1 else int(self.warmup)


_HYPER = (
    "lr", "betas", "eps", "weight_decay", "momentum", "precondition_frequency", "beta2_decay",
    "aux_lr",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Loop length, batch, evaluation and checkpoint cadence, device and precision."""

    steps: int = 1000
    """Optimiser steps."""
    batch_size: int = 16
    """Sequences per micro-batch per rank. Global batch = batch_size × grad_accum × ranks."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (per rank)."""
    seed: int = 0
    """Seeds the model init and the batch sampler."""
    log_every: int = 10
    """Write a metrics.jsonl line (and a progress line when not on a terminal) every k steps."""
    eval_every: int = 200
    """Validation loss every k steps (and at the end); 0 = only at the end."""
    eval_windows: int = 64
    """Number of fixed validation windows (seq_len tokens each)."""
    ckpt_every: int = 250
    """Checkpoint every k steps (and at the end); 0 = only at the end."""
    keep_ckpts: int = 2
    """Keep the last N checkpoints."""
    device: str = "auto"
    """auto (cuda if available, else cpu), cpu, cuda, cuda:N."""
    precision: str = "auto"
    """auto (fp32 on CPU, bf16 autocast on CUDA), fp32, bf16."""
    compile: bool = False
    """torch.compile the model."""
    threads: int = 0
    """CPU threads for torch (``torch.set_num_threads``) during the run; 0 = leave as is. Tiny
    models run fastest on 1, and 2+ threads on an oversubscribed machine can be many times
    slower."""

    def __post_init__(self) -> None:
        for k in ("steps", "batch_size", "grad_accum", "log_every", "eval_windows", "keep_ckpts"):
            _positive("train", k, getattr(self, k))
        for k in ("seed", "eval_every", "ckpt_every", "threads"):
            _positive("train", k, getattr(self, k), 0)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision={self.precision!r}; allowed: auto, fp32, bf16")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(f"train.device={self.device!r}; allowed: auto, cpu, cuda, cuda:N")


@dataclass
class LogConfig:
    """Outlier-feature monitoring and metric sinks."""

    kurtosis_every: int = 50
    """Measure Kurt/MMR/cos-sim of the residual stream on the training batch every k steps;
    0 = never."""
    tensorboard: bool = False
    """Write TensorBoard events to RUN_DIR/tb."""
    wandb: bool = False
    """Log to Weights & Biases (needs ``pip install wandb``)."""
    wandb_project: str = "outlierlab"
    """W&B project name."""

    def __post_init__(self) -> None:
        _positive("log", "kurtosis_every", self.kurtosis_every, 0)


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
        return _flatten(self.to_dict())

    def to_toml(self) -> str:
        """The resolved config as TOML (fields that are ``None`` become comments)."""
        lines = [f"out = {json.dumps(self.out)}"]
        for s, sec in self.to_dict().items():
            if s == "out":
                continue
            lines.append(f"\n[{s}]")
            for k, v in sec.items():
                lines.append(f"# {k} = (unset)" if v is None else f"{k} = {json.dumps(v)}")
        return "\n".join(lines) + "\n"


def _asdict(obj: Any) -> dict[str, Any]:
    d = obj.to_dict() if hasattr(obj, "to_dict") else dataclasses.asdict(obj)
    return json.loads(json.dumps(d))


def _flatten(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            out[k] = v
    return out


SECTION_TYPES: dict[str, type] = {
    "model": GPTConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "log": LogConfig,
}


def _fields(section: str) -> dict[str, Any]:
    cls = SECTION_TYPES[section]
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _unknown(name: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(close)}?" if close else f"allowed: {', '.join(allowed)}"
    return ConfigError(f"unknown field {name!r}; {hint}")


def _build(raw: dict[str, Any]) -> RunConfig:
    raw = dict(raw)
    unknown = set(raw) - {*SECTIONS, "out"}
    for k in sorted(unknown):
        raise _unknown(k, [*SECTIONS, "out"])
    kw: dict[str, Any] = {}
    for s in SECTIONS:
        sec = dict(raw.get(s) or {})
        if not isinstance(sec, dict):
            raise ConfigError(f"{s} must be a table of fields, got {sec!r}")
        fields = _fields(s)
        preset = sec.pop("preset", None) if s == "model" else None
        for k, v in list(sec.items()):
            if k not in fields:
                raise _unknown(f"{s}.{k}", [f"{s}.{f}" for f in fields])
            sec[k] = _coerce(v, fields[k], f"{s}.{k}")
        try:
            if s == "model" and preset is not None:
                kw[s] = GPTConfig.preset(str(preset), **sec)
            else:
                kw[s] = SECTION_TYPES[s](**sec)
        except TypeError as exc:  # e.g. a wrong type reaching a dataclass
            raise ConfigError(f"{s}: {exc}") from None
    out = raw.get("out", "")
    return RunConfig(**kw, out=str(out) if out is not None else "")


# --------------------------------------------------------------------------- values


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Convert a TOML value or an override string to the field's type ``tp``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        is_none = value is None or (isinstance(value, str) and value.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, name)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if errors else ConfigError(f"{name}={value!r} is not allowed")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{name}={value!r}; allowed: {', '.join(map(str, allowed))}")
        return value
    if origin in (tuple, list):
        if isinstance(value, str):
            s = value.strip().strip("[]()")
            items = [x.strip() for x in s.split(",") if x.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise ConfigError(f"{name}={value!r} is not allowed; allowed: a list like 0.9,0.95")
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [str]
        conv = [_coerce(x, args[min(i, len(args) - 1)], name) for i, x in enumerate(items)]
        if origin is tuple and Ellipsis not in typing.get_args(tp) and len(conv) != len(args):
            raise ConfigError(f"{name}={value!r} is not allowed; allowed: {len(args)} values")
        return origin(conv)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: true, false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not allowed; allowed: an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                    if f.is_integer():
                        return int(f)
                except ValueError:
                    pass
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} is not allowed; allowed: a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{name}={value!r} is not allowed; allowed: a number") from None
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{name}={value!r} is not allowed; allowed: a string")
        return str(value)
    return value


# --------------------------------------------------------------------------- presets and files


def preset_names() -> list[str]:
    """Training presets shipped in ``outlierlab/presets/train``."""
    folder = resources.files("outlierlab") / "presets" / "train"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def read_preset(name: str) -> dict[str, Any]:
    folder = resources.files("outlierlab") / "presets" / "train"
    path = folder / f"{name}.toml"
    if not path.is_file():
        raise ConfigError(f"unknown training preset {name!r}; allowed: {', '.join(preset_names())}")
    return tomllib.loads(path.read_text())


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    try:
        return tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML ({exc})") from None


def merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """Section-wise merge of raw dicts; ``top`` wins. When ``top`` switches ``optim.name``, the
    optimiser hyperparameters of ``base`` are dropped (the new optimiser's defaults apply)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    new_name = (top.get("optim") or {}).get("name")
    if new_name is not None and new_name != (out.get("optim") or {}).get("name", "adamw"):
        out["optim"] = {k: v for k, v in out["optim"].items() if k not in _HYPER}
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
            raw.setdefault("model", {})["preset"] = value
            continue
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            all_names = ["out", "model", *(f"{s}.{f}" for s in SECTIONS for f in _fields(s))]
            raise _unknown(key, all_names)
        fields = _fields(section)
        if name not in fields:
            raise _unknown(key, [f"{section}.{f}" for f in fields])
        raw.setdefault(section, {})[name] = _coerce(value, fields[name], key)
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
        raise ConfigError(f"{run_dir} is not a run folder (no config.json) to resume")
    pairs = [parse_override(t) for t in overrides or []]
    for key, _ in pairs:
        if key in ("model", "out"):
            raise ConfigError(f"{key}= cannot change on resume; the run folder fixes it")
    raw = apply_overrides(run.config, list(overrides or []))
    raw["out"] = str(run_dir)
    return _build(raw)
