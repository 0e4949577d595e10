"""The mitigations leaderboard (issue 25, docs/mitigations.md): every published way to train
without outlier features, ranked on the same runs with the same statistics.

Per method (:func:`method_label`: the run label of :mod:`.results` plus ``+tweo`` and the
optimiser), over its finished seeds: final Kurt (held-out, science §1 Eq. 1) and its growth
Kurt − Kurt₀ (:attr:`RunRecord.kurt_growth`), max |x| / median and the
first-token attention mass of the final model (``measure.json``), validation loss, the relative
perplexity increase under W8A8 / W6A6 / W4A4 with rotation (:data:`SCHEMES`; a scheme a run was
not quantised with is *missing*, never 0), and the step time relative to the baseline (from
the logged tokens/s). Each method is paired with the Pre-LN + AdamW baseline (:data:`BASELINE`)
seed by seed with the project's test of an effect (:class:`~.significance.EffectTest`: the
same-seed differences baseline − method and the exact sign-flip permutation p; 3 pairs all one
way give p = 1/8). Methods are ranked by seed-mean final Kurt.
The published headline of each method's paper stands beside ours (:data:`HEADLINES`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from outlierlab import safe_io
from outlierlab.experiments.results import RunRecord
from outlierlab.experiments.significance import EffectTest
from outlierlab.experiments.tables import md_table
from outlierlab.jsonable import json_safe

BASELINE = "pre-ln adamw"
"""The reference every method is paired with: the Pre-LN block with AdamW."""
SCHEMES = (("W8A8", "w8a8-tensor"), ("W6A6", "w6a6-tensor"), ("W4A4 rot.", "w4a4-online"))
"""(column, quantisation scheme) of the damage columns; W4A4 with the QuaRot-style rotation."""
MITIGATION_OPTIMISERS = ("orthoadam", "muon")


@dataclass(frozen=True)
class Headline:
    """A method's published result, and the scale it was measured at."""

    paper: str
    result: str
    scale: str


HEADLINES: dict[str, Headline] = {
    "pre-ln+softmax1 orthoadam": Headline(
        "OrthoAdam (ICLR 2025)", "kurtosis 1657 → 3.1; first-token attention 65 % → 3.3 %",
        "(not quoted in issue 25)"),
    "pre-ln orthoadam": Headline(
        "OrthoAdam (ICLR 2025)", "the optimiser half of OrthoAdam's recipe (with "
        "softmax-plus-one)", "(not quoted in issue 25)"),
    "pre-ln+softmax1 adamw": Headline(
        "OrthoAdam (ICLR 2025)", "the softmax-plus-one half of OrthoAdam's recipe",
        "(not quoted in issue 25)"),
    "pre-ln+softpick adamw": Headline(
        "Softpick (2025)", "kurtosis 33 510 → 340; no attention sinks", "340M parameters"),
    "pre-ln+clipped adamw": Headline(
        "Clipped softmax (Bondarenko et al. 2023)", "full INT8 for BERT and OPT",
        "BERT, OPT"),
    "pre-ln+gate-head adamw": Headline(
        "Gated attention (Qiu et al., NeurIPS 2025)", "removes attention sinks and massive "
        "activations (used in Qwen3-Next)", "(not quoted in issue 25)"),
    "pre-ln+gate-elem adamw": Headline(
        "Gated attention (Qiu et al., NeurIPS 2025)", "removes attention sinks and massive "
        "activations (used in Qwen3-Next)", "(not quoted in issue 25)"),
    "pre-ln+kv-bias adamw": Headline(
        "Attention bias (Sun et al. 2024)", "GPT-2 retrained with it has no massive "
        "activations", "GPT-2"),
    "pre-ln+tweo adamw": Headline(
        "TWEO (2025)", "an Lp penalty on block outputs added to the loss (no number quoted "
        "in issue 25)", "(not quoted in issue 25)"),
    "pre-ssnorm+embproj muon": Headline(
        "OSP (2025)", "excess kurtosis 1818 → 0.04; W4A4 (RTN) perplexity 14 475 → 45.9",
        "1.4B parameters"),
    "pre-ssnorm adamw": Headline("OSP (2025)", "one part of OSP's recipe (Muon + SSNorm + "
                                 "EmbProj)", "1.4B parameters"),
    "pre-ln+embproj adamw": Headline("OSP (2025)", "one part of OSP's recipe (Muon + SSNorm "
                                     "+ EmbProj)", "1.4B parameters"),
    "pre-ln muon": Headline("OSP (2025)", "one part of OSP's recipe (Muon + SSNorm + "
                            "EmbProj)", "1.4B parameters"),
    "op adamw": Headline("OP block (He et al. 2024)", "peak kurtosis < 10 with OP, > 600 "
                         "with Pre-Norm at 1.2B and 7B (science §4.3)", "100M–7B (science §5.1)"),
    "op soap": Headline("OP + SOAP (He et al. 2024)", "average kurtosis 25.6 → 1.2; W8A8 "
                        "perplexity 16.00 → 63.4 for Pre-Norm + Adam, 14.71 → 14.87 for OP + "
                        "SOAP (science §4.3)", "OPT-125m"),
}
"""Each paper's headline as issue 25 quotes it; a method that is one part of a recipe says so."""

OUR_SCALE = ("4 layers × 128 wide (≈0.8M parameters besides the byte embedding), 300 steps of "
             "2048 tokens (0.6M tokens) of Python source as bytes")


def method_label(r: RunRecord) -> str:
    """``pre-ln+softpick adamw``, ``pre-ssnorm+embproj muon``, ``pre-ln+tweo adamw``: the
    run's block label (:func:`~.results.arch_label`), ``+tweo`` with a TWEO penalty, then the
    optimiser."""
    tweo = r.flat.get("train.tweo_weight") or 0
    return f"{r.arch}{'+tweo' if tweo else ''} {r.optimizer}"


def has_mitigations(runs: Sequence[RunRecord]) -> bool:
    """Whether the runs hold a mitigation run beside the baseline (then the report adds the
    leaderboard)."""
    labels = {method_label(r) for r in runs}
    return BASELINE in labels and any(
        "+" in lab or lab.split()[-1] in MITIGATION_OPTIMISERS for lab in labels)


def _tokens_s(r: RunRecord) -> float:
    return 1.0 / r.tokens_per_s if r.tokens_per_s > 0 else math.nan


def _damage(scheme: str) -> Callable[[RunRecord], float]:
    def get(r: RunRecord) -> float:
        q = r.quant.get(scheme)
        return q.rel_increase if q is not None else math.nan

    return get


METRICS: tuple[tuple[str, Callable[[RunRecord], float]], ...] = (
    ("kurt_final", lambda r: r.final_kurt_mean),
    ("kurt_growth", lambda r: r.kurt_growth),
    ("max_median", lambda r: r.max_median),
    ("first_token_mass", lambda r: r.first_token_mass),
    ("val_loss", lambda r: r.final_val_loss),
    *((f"damage_{s}", _damage(s)) for _, s in SCHEMES),
    ("step_s_per_token", _tokens_s),
)
"""(key, per-run value); nan where a run lacks it."""
TESTED = ("kurt_final", "kurt_growth", "val_loss", *(f"damage_{s}" for _, s in SCHEMES))
"""The metrics each method is paired with the baseline on (is the method lower?)."""


@dataclass
class Entry:
    """One method: its finished runs, per-metric values by seed, and its tests against the
    baseline."""

    method: str
    runs: list[RunRecord]
    values: dict[str, dict[Any, float]]
    tests: dict[str, EffectTest] = field(default_factory=dict)
    rank: int = 0
    step_time: float = math.nan
    """Seconds per token relative to the baseline's (seed means): 1.0 = the same compute."""
    headline: Headline | None = None
    diverged: int = 0
    """Runs of this method that diverged (not in ``runs``: they have no final values)."""
    repeats: int = 0
    """Runs left out because a run of this method with the same seed came first (the same
    point in two sweep folders, e.g. the baseline of each part of a split grid)."""

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]

    def mean(self, metric: str) -> float:
        v = [x for x in self.values[metric].values() if math.isfinite(x)]
        return float(np.mean(v)) if v else math.nan

    def count(self, metric: str) -> int:
        """Seeds with a finite value of ``metric``."""
        return sum(math.isfinite(x) for x in self.values[metric].values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank, "method": self.method, "seeds": self.seeds,
            "diverged": self.diverged, "repeats_left_out": self.repeats,
            "runs": [r.name for r in self.runs],
            "mean": {m: self.mean(m) for m, _ in METRICS},
            "by_seed": {m: {str(s): v for s, v in vals.items()} for m, vals in self.values.items()},
            "step_time_vs_baseline_logged": self.step_time,
            "vs_baseline": {m: {"seed_pairs": t.pairs, "lower_in": t.in_direction,
                                "higher_in": t.against, "p_lower": t.p, "p_higher": t.p_other,
                                "verdict": t.verdict} for m, t in self.tests.items()},
            "published": None if self.headline is None else vars(self.headline),
        }  # fmt: skip


def leaderboard(runs: Sequence[RunRecord]) -> list[Entry]:
    """The entries, ranked by seed-mean final Kurt (lowest first; methods without it last),
    each paired with the baseline where the baseline has finished runs. One run per method and
    seed: a repeat (the same point found in two folders) is counted in :attr:`Entry.repeats`,
    not twice in the means or the pairs."""
    groups: dict[str, list[RunRecord]] = {}
    diverged: dict[str, int] = {}
    repeats: dict[str, int] = {}
    seen: set[tuple[str, Any]] = set()
    for r in runs:
        m = method_label(r)
        if not (r.finished or r.diverged):
            continue
        groups.setdefault(m, [])
        if (m, r.seed) in seen:  # the same method and seed again (e.g. each part's baseline
            repeats[m] = repeats.get(m, 0) + 1  # in its own folder): the first one counts
            continue
        seen.add((m, r.seed))
        if r.finished:
            groups[m].append(r)
        else:
            diverged[m] = diverged.get(m, 0) + 1
    entries = [Entry(m, rs, {k: {r.seed: float(get(r)) for r in rs} for k, get in METRICS},
                     headline=HEADLINES.get(m), diverged=diverged.get(m, 0),
                     repeats=repeats.get(m, 0))
               for m, rs in groups.items()]
    base = next((e for e in entries if e.method == BASELINE), None)
    for e in entries:
        if base is not None:
            e.step_time = e.mean("step_s_per_token") / base.mean("step_s_per_token")
            if e is not base:
                e.tests = {m: _versus(e.values[m], base.values[m]) for m in TESTED
                           if e.count(m) and base.count(m)}
    entries.sort(key=lambda e: (not math.isfinite(e.mean("kurt_final")), e.mean("kurt_final"),
                                e.method))
    for i, e in enumerate(entries, 1):
        e.rank = i
    return entries


def _versus(method: dict[Any, float], base: dict[Any, float]) -> EffectTest:
    """Is the method below the baseline? One cell of same-seed differences baseline − method
    (seeds with a finite value on both sides)."""
    return EffectTest.of([{s: base[s] - v for s, v in method.items()
                           if s in base and math.isfinite(v) and math.isfinite(base[s])}])


# -- rendering ---------------------------------------------------------------------------------


def _num(x: float, spec: str = ".2f") -> str:
    return format(x, spec) if math.isfinite(x) else ("inf" if x == math.inf else "–")


def _cell(e: Entry, metric: str, spec: str = ".2f", pct: bool = False) -> str:
    """Seed mean, with ``(k of n)`` when only some seeds have it, ``missing`` when none."""
    n, k = len(e.runs), e.count(metric)
    if k == 0:
        return "missing"
    m = e.mean(metric)
    text = f"{m:+.2%}" if pct else _num(m, spec)
    return text if k == n else f"{text} ({k} of {n})"


def _test_cell(e: Entry, metric: str) -> str:
    t = e.tests.get(metric)
    if t is None:
        return "baseline" if e.method == BASELINE else "–"
    return f"{t.in_direction}/{t.pairs}, p={t.p:.3f}" if t.pairs else "no common seed"


def table(entries: Sequence[Entry]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leaderboard (one row per method, in rank order)."""
    header = ["rank", "method", "seeds", "Kurt final", "Kurt growth", "max|x|/median",
              "first-token attn.", "val loss", *(f"{c} damage" for c, _ in SCHEMES),
              "Kurt < base (pairs, p)", "growth < base (pairs, p)"]
    rows = []
    for e in entries:
        rows.append([
            str(e.rank), e.method,
            str(len(e.runs)) + (f" (+{e.diverged} diverged)" if e.diverged else "")
            + (f" ({e.repeats} repeated seed(s) left out)" if e.repeats else ""),
            _cell(e, "kurt_final"),
            _cell(e, "kurt_growth", "+.2f"), _cell(e, "max_median", ".1f"),
            _cell(e, "first_token_mass", ".1%"), _cell(e, "val_loss", ".3f"),
            *(_cell(e, f"damage_{s}", pct=True) for _, s in SCHEMES),
            _test_cell(e, "kurt_final"), _test_cell(e, "kurt_growth"),
        ])  # fmt: skip
    return header, rows


def headline_table(entries: Sequence[Entry]) -> tuple[list[str], list[list[str]]]:
    """The published headline beside ours: per method with a paper, its result and scale, and
    our final Kurt against the baseline's and our first-token attention."""
    base = next((e for e in entries if e.method == BASELINE), None)
    header = ["method", "paper", "published", "their scale", "ours: Kurt (base → method)",
              "ours: first-token attn. (base → method)", "ours: W4A4 rot. damage"]
    rows = []
    for e in entries:
        if e.headline is None:
            continue
        h = e.headline
        bk = _num(base.mean("kurt_final")) if base else "–"
        bs = _cell(base, "first_token_mass", ".1%") if base else "–"
        rows.append([e.method, h.paper, h.result, h.scale,
                     f"{bk} → {_cell(e, 'kurt_final')}",
                     f"{bs} → {_cell(e, 'first_token_mass', '.1%')}",
                     _cell(e, "damage_w4a4-online", pct=True)])  # fmt: skip
    return header, rows


def markdown(entries: Sequence[Entry], command: str = "", when: str = "") -> str:
    """The leaderboard page: how it was made, the table, the published headlines, a key."""
    n = {len(e.runs) for e in entries if e.runs}
    seeds = (f"{min(n)}" if len(n) == 1 else f"{min(n)}–{max(n)}") if n else "0"
    head = [f"Made by `{command}`" + (f" on {when}" if when else "") + "." if command else "",
            f"{len(entries)} methods, {seeds} finished seed(s) each (column *seeds*, with the "
            "runs that diverged, which have no final values); our "
            f"scale: {OUR_SCALE}.", ""]
    key = ("Ranked by seed-mean final Kurt (science §1 Eq. 1, layer mean on the held-out "
           "windows; 1 = no outlier features). *Kurt growth* = Kurt − Kurt₀, "
           "Kurt₀ the first measured value (step 0). *max|x|/median* (largest over the residual "
           "points) and *first-token attn.* (mean attention probability on token 0 over "
           "layers, heads and queries ≥ 1) are measured post hoc on the final model "
           "(`outlierlab measure RUN --save`). Damage = quantised / FP perplexity − 1 "
           "(`w8a8-tensor`, `w6a6-tensor`, `w4a4-online`: W4A4 round-to-nearest after the "
           "QuaRot-style rotation with the online Hadamard on the MLP down-projection); "
           "*missing* = not quantised with that scheme (never read as 0). Extra compute "
           "per step: benchmarks/mitigations_step.py (CPU time per step, interleaved); the "
           "runs' own tokens/s (`step_time_vs_baseline_logged` in leaderboard.json) is wall "
           "time on a shared machine and says more about the load than the method. "
           "*Kurt < base*: same-seed pairs in which the method is below the Pre-LN + AdamW "
           "baseline, and the exact one-sided sign-flip p of the "
           "mean difference (the project's test of an effect; 3 pairs all one way: p = 1/8, "
           "so 3 seeds cannot reach p ≤ 0.1).")
    return "\n".join([*head, md_table(*table(entries)), "", key, "",
                      "### Published headline beside ours", "",
                      md_table(*headline_table(entries)), ""])


def figure(entries: Sequence[Entry], path: Path) -> Path | None:
    """Three panels, one row per method in rank order: final Kurt, first-token attention,
    W4A4-rot. damage; each seed a dot, the mean a bar."""
    if not entries:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from outlierlab.safe_io import save_figure

    panels = (("kurt_final", "final Kurt (held-out)", 1.0),
              ("first_token_mass", "first-token attention (%)", 100.0),
              ("damage_w4a4-online", "W4A4 rot. damage (%)", 100.0))
    fig, axes = plt.subplots(1, 3, figsize=(11, 0.28 * len(entries) + 1.4), sharey=True)
    y = np.arange(len(entries))[::-1]
    for ax, (metric, title, scale) in zip(axes, panels):
        for yi, e in zip(y, entries):
            vals = [v * scale for v in e.values[metric].values() if math.isfinite(v)]
            colour = "tab:red" if e.method == BASELINE else "tab:blue"
            if vals:
                ax.barh(yi, np.mean(vals), color=colour, alpha=0.35)
                ax.plot(vals, [yi] * len(vals), "o", color=colour, ms=3)
            else:
                ax.text(0, yi, " missing", va="center", fontsize=7, color="gray")
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(y, [e.method for e in entries])
    fig.tight_layout()
    try:
        save_figure(fig, path, dpi=80)
    finally:
        plt.close(fig)
    return path


def write_leaderboard(runs: Sequence[RunRecord], out_dir: str | Path, command: str = "",
                      when: str = "") -> tuple[list[Entry], dict[str, Path]]:
    """Write ``leaderboard.md``, ``leaderboard.json`` and ``leaderboard.png`` into
    ``out_dir``; returns the entries and the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    entries = leaderboard(runs)
    paths = {"md": out / "leaderboard.md", "json": out / "leaderboard.json"}
    safe_io.write_text(paths["md"], "# Mitigations leaderboard\n\n" +
                       markdown(entries, command, when))
    data = {"command": command, "written": when, "baseline": BASELINE, "scale": OUR_SCALE,
            "schemes": dict(SCHEMES), "entries": [e.to_dict() for e in entries]}
    safe_io.write_text(paths["json"], json.dumps(json_safe(data), indent=1, default=str))
    png = figure(entries, out / "leaderboard.png")
    if png is not None:
        paths["png"] = png
    return entries, paths

