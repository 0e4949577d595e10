"""Load a run folder (docs/ARCHITECTURE.md, "Run folder") into a typed :class:`RunResult`.

Reads ``config.json``, ``status.json``, ``metrics.jsonl`` and ``quant/<scheme>.json``; never
the weights. "Final" kurtosis is the last monitor step's value, "peak" the largest over
training; "mean"/"max" are over the measured layers (SPEC §1, Eq. 1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from outlierlab.errors import DataError

IGNORED_FOR_IDENTITY = ("out", "log.", "train.ckpt_every", "train.keep_checkpoints",
                        "train.keep_last", "train.device", "train.compile", "data.cache_dir",
                        "train.log_every", "train.progress", "train.threads")
"""Config keys that never change the maths: runs differing only here are the same config."""


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def is_seed_key(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("seed", "data_seed", "init_seed")


def arch_label(model: dict[str, Any]) -> str:
    """``pre-ln``, ``pre-rms``, ``pre-srms``, ``post-ln``, ``op`` (``op-nofinal``) from a
    model config (SPEC §2); unknown combinations read ``block-norm``."""
    block = str(model.get("block", "pre"))
    norm = str(model.get("norm", "layernorm"))
    if block == "op":
        return "op" if model.get("final_norm", True) else "op-nofinal"
    short = {"layernorm": "ln", "rmsnorm": "rms", "srmsnorm": "srms"}.get(norm, norm)
    return f"{block}-{short}"


@dataclass(frozen=True)
class QuantResult:
    """One scheme's perplexities (written by ``outlierlab quantize --json``)."""

    scheme: str
    fp_ppl: float
    quant_ppl: float

    @property
    def increase(self) -> float:
        """Absolute perplexity increase, quant − FP."""
        return self.quant_ppl - self.fp_ppl

    @property
    def rel_increase(self) -> float:
        """Relative increase quant/FP − 1."""
        return self.quant_ppl / self.fp_ppl - 1.0


@dataclass
class RunResult:
    """Everything the report needs from one run folder."""

    path: Path
    config: dict[str, Any]
    status: str
    step: int
    message: str = ""
    loss_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kurt_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kurtosis: dict[str, np.ndarray] = field(default_factory=dict)
    """Per measured point (model order), Kurt at each of ``kurt_steps``."""
    cos_sim: dict[str, np.ndarray] = field(default_factory=dict)
    tokens_per_s: float = math.nan
    quant: dict[str, QuantResult] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def flat(self) -> dict[str, Any]:
        return flatten(self.config)

    @property
    def arch(self) -> str:
        return arch_label(self.config.get("model", {}))

    @property
    def optimizer(self) -> str:
        return str(self.config.get("optim", {}).get("name", "?"))

    @property
    def lr(self) -> float:
        return _num(self.config.get("optim", {}).get("lr"))

    @property
    def eps(self) -> float:
        return _num(self.config.get("optim", {}).get("eps"))

    @property
    def seed(self) -> Any:
        seeds = [v for k, v in self.flat.items() if is_seed_key(k)]
        return seeds[0] if seeds else None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    def identity(self, ignore: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
        """Config as a hashable key without seeds, maths-free keys and ``ignore`` keys
        (a key ending in ``.`` ignores a whole section)."""
        skip = IGNORED_FOR_IDENTITY + ignore
        return tuple(sorted(
            (k, json.dumps(v, sort_keys=True)) for k, v in self.flat.items()
            if not is_seed_key(k) and not any(k == s or (s.endswith(".") and k.startswith(s))
                                              for s in skip)))

    # --- kurtosis summaries -----------------------------------------------------------
    def _layer_matrix(self) -> np.ndarray:
        if not self.kurtosis:
            return np.zeros((0, 0))
        return np.stack([self.kurtosis[p] for p in self.kurtosis], axis=1)  # (steps, points)

    @property
    def kurt_mean_series(self) -> np.ndarray:
        m = self._layer_matrix()
        return np.nanmean(m, axis=1) if m.size else np.zeros(0)

    @property
    def kurt_max_series(self) -> np.ndarray:
        m = self._layer_matrix()
        return np.nanmax(m, axis=1) if m.size else np.zeros(0)

    @property
    def final_kurt_mean(self) -> float:
        s = self.kurt_mean_series
        return float(s[-1]) if s.size else math.nan

    @property
    def final_kurt_max(self) -> float:
        s = self.kurt_max_series
        return float(s[-1]) if s.size else math.nan

    @property
    def peak_kurt_mean(self) -> float:
        s = self.kurt_mean_series
        return float(np.nanmax(s)) if s.size else math.nan

    @property
    def peak_kurt_max(self) -> float:
        s = self.kurt_max_series
        return float(np.nanmax(s)) if s.size else math.nan

    @property
    def final_cos_sim(self) -> float:
        """Mean over points of the last measured token cosine similarity (SPEC §1)."""
        vals = [v[-1] for v in self.cos_sim.values() if v.size and np.isfinite(v[-1])]
        return float(np.mean(vals)) if vals else math.nan

    @property
    def final_val_loss(self) -> float:
        return float(self.val_loss[-1]) if self.val_loss.size else math.nan

    @property
    def final_loss(self) -> float:
        return float(self.loss[-1]) if self.loss.size else math.nan


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: cannot read JSON ({exc}); allowed: a run folder's JSON file") \
            from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object")
    return data


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (
        (path / "status.json").is_file() or (path / "metrics.jsonl").is_file())


def load_run(path: str | Path) -> RunResult:
    """Read a run folder into a :class:`RunResult` (→ ``DataError`` if it is not one)."""
    path = Path(path)
    if not is_run_dir(path):
        raise DataError(f"{path} is not a run folder; allowed: a folder with config.json and "
                        "status.json or metrics.jsonl")
    config = _read_json(path / "config.json")
    status = _read_json(path / "status.json") if (path / "status.json").is_file() else {}
    loss_s, loss, val_s, val, k_steps, tps = [], [], [], [], [], []
    kurt: dict[str, list[float]] = {}
    cos: dict[str, list[float]] = {}
    mfile = path / "metrics.jsonl"
    lines = mfile.read_text().splitlines() if mfile.is_file() else []
    for line in lines:
        line = line.strip()
        if not line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        step = int(rec.get("step", 0))
        if "loss" in rec:
            loss_s.append(step)
            loss.append(_num(rec["loss"]))
        if "val_loss" in rec:
            val_s.append(step)
            val.append(_num(rec["val_loss"]))
        if "tokens_per_s" in rec:
            tps.append(_num(rec["tokens_per_s"]))
        if isinstance(rec.get("kurtosis"), dict):
            idx = len(k_steps)
            k_steps.append(step)
            for name, series in (("kurtosis", kurt), ("cos_sim", cos)):
                for p, v in (rec.get(name) or {}).items():
                    series.setdefault(p, [math.nan] * idx).append(_num(v))
            for series in (kurt, cos):
                for v in series.values():
                    v.extend([math.nan] * (idx + 1 - len(v)))
    quant = {}
    qdir = path / "quant"
    if qdir.is_dir():
        for q in sorted(qdir.glob("*.json")):
            d = _read_json(q)
            if "fp_ppl" in d and "quant_ppl" in d:
                scheme = str(d.get("scheme", q.stem)) if q.stem == "results" else q.stem
                quant[scheme] = QuantResult(scheme, _num(d["fp_ppl"]), _num(d["quant_ppl"]))
    finite_tps = [t for t in tps if math.isfinite(t)]
    return RunResult(
        path=path, config=config, status=str(status.get("status", "unknown")),
        step=int(status.get("step", loss_s[-1] if loss_s else 0)),
        message=str(status.get("message", "") or ""),
        loss_steps=np.array(loss_s, dtype=np.int64), loss=np.array(loss, dtype=float),
        val_steps=np.array(val_s, dtype=np.int64), val_loss=np.array(val, dtype=float),
        kurt_steps=np.array(k_steps, dtype=np.int64),
        kurtosis={p: np.array(v, dtype=float) for p, v in kurt.items()},
        cos_sim={p: np.array(v, dtype=float) for p, v in cos.items()},
        tokens_per_s=float(np.median(finite_tps)) if finite_tps else math.nan,
        quant=quant)


def find_runs(paths: list[str | Path]) -> list[RunResult]:
    """Load run folders; a folder that is not a run but holds runs (a sweep) is expanded,
    other folders (logs, reports) passed in by a shell glob are skipped."""
    runs: list[RunResult] = []
    for p in map(Path, paths):
        if is_run_dir(p):
            runs.append(load_run(p))
        elif p.is_dir():
            runs += [load_run(c) for c in sorted(p.iterdir()) if c.is_dir() and is_run_dir(c)]
        elif not p.exists():
            raise DataError(f"{p} does not exist; allowed: run folders or a sweep folder")
    if not runs:
        raise DataError(f"no run folders among {', '.join(map(str, paths))}; allowed: folders "
                        "with config.json and status.json")
    seen, unique = set(), []
    for r in runs:
        key = r.path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique
