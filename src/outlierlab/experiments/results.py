"""Read a finished (or stopped) run folder into a typed :class:`RunRecord` for claims and the
report, through :class:`~outlierlab.run_folder.RunFolder`: config, status, metrics and
quantisation results and the post-hoc measurement of the final model (``measure.json``:
massive activations and attention sinks, written by ``outlierlab measure RUN --save``); never
the weights. "Final" kurtosis is :func:`~outlierlab.metric_rows.final_kurtosis`: the held-out
value (the monitor over the fixed validation windows in the evaluation at the run's last step);
runs logged without it fall back to the last training batch measured.
"Peak" is the largest over training, "init" the step-0 value; "mean"/"max" are over the
measured layers (science §1, Eq. 1).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from outlierlab import config as run_config
from outlierlab.errors import DataError, RunFolderError
from outlierlab.fields import SEED, flatten
from outlierlab.metric_rows import (
    HELD_OUT,
    MONITOR_POINT_FIELDS,
    FinalKurtosis,
    final_kurtosis_of,
)
from outlierlab.run_folder import (
    RUN_CONFIG_FILE,
    STATUS_FILE,
    RunFolder,
    find_runs,
    read_json_object,
)


def arch_label(model: dict[str, Any]) -> str:
    """``pre-ln``, ``pre-rms``, ``pre-srms``, ``post-ln``, ``op`` (``op-nofinal``) from a
    model config (science §2); unknown combinations read ``block-norm``. The mitigations of
    docs/mitigations.md are appended: ``pre-ln+softpick``, ``op+gate-elem``, ``+kv-bias``,
    ``+embproj`` (``pre-ssnorm`` for single-scale RMSNorm)."""
    return _block_label(model) + "".join(f"+{t}" for t in _mitigation_tags(model))


def _block_label(model: dict[str, Any]) -> str:
    block = str(model.get("block", "pre"))
    norm = str(model.get("norm", "layernorm"))
    if block == "op":
        label = "op" if model.get("final_norm", True) else "op-nofinal"
        unregulated = not model.get("qk_norm", True) and model.get("logit_softcap") is None
        return label + ("-noqk" if unregulated else "")
    short = {"layernorm": "ln", "rmsnorm": "rms", "srmsnorm": "srms"}.get(norm, norm)
    beta = model.get("beta", 1.0)
    return f"{block}-{short}" + ("" if beta in (1, 1.0, None) else f" β={beta}")


def _mitigation_tags(model: dict[str, Any]) -> list[str]:
    tags = []
    if model.get("attn", "softmax") != "softmax":
        tags.append(str(model["attn"]))
    if model.get("attn_gate", "none") != "none":
        tags.append(f"gate-{model['attn_gate']}")
    if model.get("attn_bias_kv"):
        tags.append("kv-bias")
    if model.get("embed_proj"):
        tags.append("embproj")
    return tags


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
class RunRecord:
    """Everything the report needs from one run folder (read from disk; what ``train``
    returns is the trainer's own result)."""

    path: Path
    config: dict[str, Any]
    status: str
    step: int
    message: str = ""
    loss_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_loss: np.ndarray = field(default_factory=lambda: np.zeros(0))
    val_kurt: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """The held-out mean Kurt over layers (``val_kurtosis_mean``) logged with each
    ``val_loss`` (nan where an evaluation did not log it): the run's (loss, Kurt) trajectory."""
    kurt_steps: np.ndarray = field(default_factory=lambda: np.zeros(0))
    kurtosis: dict[str, np.ndarray] = field(default_factory=dict)
    """Per measured point (model order), Kurt at each of ``kurt_steps``."""
    cos_sim: dict[str, np.ndarray] = field(default_factory=dict)
    layer_series: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    """Every per-layer metric of the monitor steps (:data:`LAYER_METRICS`): metric → point →
    values at ``kurt_steps`` (NaN where a step lacks it)."""
    tokens_per_s: float = math.nan
    quant: dict[str, QuantResult] = field(default_factory=dict)
    finals: dict[str, tuple[int, float]] = field(default_factory=dict)
    """The last logged value of every numeric row field, with its step."""
    last_step: int = -1
    """The largest step in ``metrics.jsonl``."""
    data_fingerprint: dict[str, Any] | None = None
    """The data the run trained on (``status.json``; None for runs that did not record it)."""
    measured: dict[str, Any] = field(default_factory=dict)
    """``measure.json`` (``outlierlab measure RUN --save``), or {} when not measured."""

    @property
    def name(self) -> str:
        """The folder's name, printable (bytes that are not UTF-8 shown as U+FFFD: fonts and
        pages cannot show surrogates)."""
        from outlierlab.safe_io import printable

        return printable(self.path.name)

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
        """The run's seed (the config fields whose role is ``seed``: ``train.seed``)."""
        seeds = [v for k, v in self.flat.items() if run_config.role(k) == SEED]
        return seeds[0] if seeds else None

    @property
    def finished(self) -> bool:
        return self.status == "finished"

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    def identity(self, ignore: tuple[str, ...] = ()) -> tuple[tuple[str, str], ...]:
        """What pairs runs, as a hashable key: the config without the fields that are seeds or
        change no computation (:data:`outlierlab.config.NOT_IDENTITY`, from the fields' roles)
        and without ``ignore`` keys (a key ending in ``.`` ignores a whole section), plus the
        data fingerprint (``data_fingerprint``: runs on different data never pair)."""
        keep = {k: v for k, v in self.flat.items()
                if k not in run_config.NOT_IDENTITY and not any(
                    k == s or (s.endswith(".") and k.startswith(s)) for s in ignore)}
        keep["data_fingerprint"] = self.data_fingerprint
        return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in keep.items()))

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

    def final(self, name: str) -> float:
        """Field ``name``'s value if it was logged at the run's last step, else nan."""
        step, value = self.finals.get(name, (-1, math.nan))
        return value if step == self.last_step >= 0 else math.nan

    @property
    def final_kurt(self) -> FinalKurtosis:
        """The final Kurt and where it was measured (:func:`~outlierlab.metric_rows.final_kurtosis`,
        the one ``outlierlab runs`` prints too)."""
        return final_kurtosis_of(self.finals, self.last_step)

    @property
    def held_out(self) -> bool:
        """Whether the final Kurt was measured on the validation windows at the last step."""
        return self.final_kurt.source == HELD_OUT

    @property
    def final_kurt_mean(self) -> float:
        """Mean over layers of Kurt at the end (:func:`~outlierlab.metric_rows.final_kurtosis`:
        held-out when logged at the last step, else the last training batch measured)."""
        return self.final_kurt.mean

    @property
    def final_kurt_max(self) -> float:
        """Largest over layers of Kurt at the end (as :attr:`final_kurt_mean`)."""
        return self.final_kurt.max

    @property
    def init_kurt_mean(self) -> float:
        """Mean over layers of Kurt at step 0 (before the first update), when logged."""
        s = self.kurt_mean_series
        return float(s[0]) if s.size and self.kurt_steps[0] == 0 else math.nan

    @property
    def final_attn_entropy_min(self) -> float:
        """Smallest attention entropy over layers at the end (held-out when logged, else the
        last measured training batch); nan when the run did not log ``attn_entropy_min``."""
        held = self.final("val_attn_entropy_min")
        if math.isfinite(held):
            return held
        return self.finals.get("attn_entropy_min", (-1, math.nan))[1]

    @property
    def kurt_growth(self) -> float:
        """Kurt − Kurt₀ of the layer-mean Kurt, Kurt the final value and Kurt₀ the first
        measured one (step 0 when logged): what training added to Kurt (science §1), free of
        the starting offset; nan when either is missing. (Until 2026-12-03 it was the log
        excess ratio log(Kurt − 1) − log(Kurt₀ − 1), ill-conditioned near Kurt₀ = 1: its
        sensitivity to Kurt₀ is 1/(Kurt₀ − 1), 20 for OP's 1.05 against 3 for Pre-LN's 1.32,
        so a 0.01 wobble at step 0 moved OP's outcome by 0.2; docs/reproduce.md.)"""
        s = self.kurt_mean_series
        k0 = float(s[0]) if s.size else math.nan
        return self.final_kurt_mean - k0

    @property
    def first_token_mass(self) -> float:
        """Attention-sink share: the mean over layers and heads of the attention probability
        on token 0 (queries ≥ 1) of the final model on held-out windows (``measure.json``'s
        profile, Sun et al. 2024 §3); nan when not measured."""
        att = (self.measured.get("profile") or {}).get("attention") or []
        vals = [_num(a.get("mass_token0")) for a in att if isinstance(a, dict)]
        vals = [v for v in vals if math.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan

    @property
    def max_median(self) -> float:
        """max |x| / median |x| over the whole residual tensor (Sun et al. 2024's massive
        activation criterion), the largest over the measured points, of the final model on
        held-out windows (``measure.json``); nan when not measured."""
        pts = (self.measured.get("profile") or {}).get("points") or []
        vals = [_num(p.get("max_median_ratio")) for p in pts if isinstance(p, dict)]
        vals = [v for v in vals if not math.isnan(v)]
        return float(max(vals)) if vals else math.nan

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
        """Mean over points of the last measured token cosine similarity (science §1)."""
        vals = [v[-1] for v in self.cos_sim.values() if v.size and np.isfinite(v[-1])]
        return float(np.mean(vals)) if vals else math.nan

    @property
    def final_val_loss(self) -> float:
        return float(self.val_loss[-1]) if self.val_loss.size else math.nan

    def trajectory(self) -> tuple[np.ndarray, np.ndarray]:
        """``(val_loss, Kurt)`` at the evaluations that logged both (the held-out mean Kurt over
        layers, :attr:`val_kurt`), in step order: the run's path in the Kurt–loss plane."""
        ok = np.isfinite(self.val_loss) & np.isfinite(self.val_kurt) if self.val_kurt.size \
            else np.zeros(0, dtype=bool)
        return self.val_loss[ok], self.val_kurt[ok]

    @property
    def final_loss(self) -> float:
        return float(self.loss[-1]) if self.loss.size else math.nan


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


LAYER_METRICS = MONITOR_POINT_FIELDS
"""The per-layer ``{point: value}`` fields of a monitor step's ``metrics.jsonl`` row."""


def _series(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The arrays of a :class:`RunRecord` from ``metrics.jsonl`` rows."""
    loss_s, loss, val_s, val, val_k, k_steps, tps = [], [], [], [], [], [], []
    layers: dict[str, dict[str, list[float]]] = {m: {} for m in LAYER_METRICS}
    finals: dict[str, tuple[int, float]] = {}
    for rec in rows:
        step = rec["step"]
        finals.update({k: (step, _num(v)) for k, v in rec.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)})
        if "loss" in rec:
            loss_s.append(step)
            loss.append(_num(rec["loss"]))
        if "val_loss" in rec:
            val_s.append(step)
            val.append(_num(rec["val_loss"]))
            val_k.append(_num(rec.get("val_kurtosis_mean")))
        if "tokens_per_s" in rec:
            tps.append(_num(rec["tokens_per_s"]))
        if isinstance(rec.get("kurtosis"), dict):
            idx = len(k_steps)
            k_steps.append(step)
            for name, series in layers.items():
                values = rec.get(name)
                for p, v in (values if isinstance(values, dict) else {}).items():
                    series.setdefault(p, [math.nan] * idx).append(_num(v))
            for series in layers.values():
                for v in series.values():
                    v.extend([math.nan] * (idx + 1 - len(v)))
    finite_tps = [t for t in tps if math.isfinite(t)]
    arrays = {m: {p: np.array(v, dtype=float) for p, v in s.items()} for m, s in layers.items()}
    return dict(
        loss_steps=np.array(loss_s, dtype=np.int64), loss=np.array(loss, dtype=float),
        val_steps=np.array(val_s, dtype=np.int64), val_loss=np.array(val, dtype=float),
        val_kurt=np.array(val_k, dtype=float),
        kurt_steps=np.array(k_steps, dtype=np.int64),
        kurtosis=arrays["kurtosis"], cos_sim=arrays["cos_sim"], layer_series=arrays,
        tokens_per_s=float(np.median(finite_tps)) if finite_tps else math.nan,
        finals=finals, last_step=max((r["step"] for r in rows), default=-1))


def _quant(run: RunFolder) -> dict[str, QuantResult]:
    return {scheme: QuantResult(scheme, _num(d["fp_ppl"]), _num(d["quant_ppl"]))
            for scheme, d in run.quant_results().items() if "fp_ppl" in d and "quant_ppl" in d}


def load_run(path: str | Path | RunFolder) -> RunRecord:
    """Read a run folder into a :class:`RunRecord` (→ ``DataError`` if it is not one,
    ``RunFolderError`` if its files cannot be read)."""
    run = path if isinstance(path, RunFolder) else RunFolder(path)
    if not run.is_run:
        raise DataError(f"{run.path} is not a run folder; allowed: a folder with "
                        f"{run.config_file.name} "
                        "written by outlierlab train")
    config, status, rows = run.config, run.status, run.metrics
    step = status.get("step", rows[-1]["step"] if rows else 0)
    return RunRecord(
        path=run.path, config=config, status=str(status.get("status", "unknown")),
        step=int(_num(step)) if math.isfinite(_num(step)) else 0,
        message=str(status.get("message", "") or ""), quant=_quant(run),
        data_fingerprint=fp if isinstance(fp := status.get("data_fingerprint"), dict) else None,
        measured=read_json_object(run.measure_file) if run.measure_file.is_file() else {},
        **_series(rows))


def load_runs(paths: list[str | Path]) -> tuple[list[RunRecord], list[tuple[Path, str]]]:
    """The records of the run folders among ``paths`` (see
    :func:`~outlierlab.run_folder.find_runs`), and ``(folder, reason)`` for each run whose files
    cannot be read. ``DataError`` when a path does not exist or nothing is a run."""
    for p in map(Path, paths):
        if not p.exists():
            raise DataError(f"{p} does not exist; allowed: run folders or a sweep folder")
    records, unreadable = [], []
    for run in find_runs(paths):
        try:
            records.append(load_run(run))
        except RunFolderError as exc:
            unreadable.append((run.path, str(exc)))
    if not records and not unreadable:
        raise DataError(f"no run folders among {', '.join(map(str, paths))}; allowed: folders "
                        f"with {RUN_CONFIG_FILE} and {STATUS_FILE}")
    return records, unreadable


def finished_quant_results(runs: Sequence[RunRecord]) -> Iterator[tuple[RunRecord, str,
                                                                        dict[str, Any]]]:
    """(run, scheme, its ``quant/<scheme>.json`` as written) for every finished run, schemes in
    name order; a run whose results cannot be read is skipped (what the per-run analyses of the
    report, :mod:`.mechanism` and :mod:`.predictors`, read)."""
    for r in runs:
        if not r.finished:
            continue
        try:
            results = RunFolder(r.path).quant_results()
        except RunFolderError:
            continue
        for scheme in sorted(results):
            yield r, scheme, results[scheme]
