"""The report's figures (matplotlib, Agg backend), one function per figure, each returning
a PNG path or ``None`` when the runs cannot draw it (e.g. no learning-rate sweep).

The figures follow science §5: per-layer Kurt vs step (one panel per configuration, shared axes,
loss beside), Kurt vs lr and vs ε (one line per block), Kurt by optimiser, signal
propagation vs Kurt, and the W8A8 perplexity increase vs Kurt; and, per layer over training
(colour = depth), the paper's signal-propagation figure (our token cos-sim beside the authors'
``batch_corr_mean``, science §1), MMR (Eq. 2) and attention entropy (science §2) where logged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from outlierlab.experiments.claims import Group, group_runs, spearman
from outlierlab.experiments.results import RunRecord

ARCH_COLOURS = {"pre-ln": "tab:red", "pre-rms": "tab:orange", "pre-srms": "tab:brown",
                "post-ln": "tab:purple", "op": "tab:blue", "op-nofinal": "tab:cyan"}
DPI = 110


def _colour(arch: str) -> str:
    return ARCH_COLOURS.get(arch, "tab:gray")


def _save(fig: plt.Figure, path: Path) -> Path:
    from outlierlab.safe_io import save_figure

    try:
        save_figure(fig, path, dpi=DPI)  # a full disk leaves no 0-byte image
    finally:
        plt.close(fig)
    return path


def config_groups(runs: Sequence[RunRecord]) -> list[list[RunRecord]]:
    """Runs with kurtosis logged, grouped by config (seeds pooled), in input order."""
    groups: dict[object, list[RunRecord]] = {}
    for r in runs:
        if r.kurt_steps.size:
            groups.setdefault(r.identity(), []).append(r)
    return list(groups.values())


def group_title(runs: Sequence[RunRecord]) -> str:
    """A panel title: the run folder name without its seed part."""
    name = runs[0].name
    parts = [p for p in name.split("-") if not p.startswith("seed")]
    title = "-".join(parts) or name
    if len(runs) > 1:
        title += f" ({len(runs)} seeds, mean)"
    bad = sorted({r.status for r in runs if not r.finished})
    if bad:
        title += f" [{', '.join(bad)}]"
    return title


def _layers(r: RunRecord, metric: str) -> dict[str, np.ndarray]:
    """Per-layer series of ``metric`` (a ``metrics.jsonl`` per-layer field) at ``kurt_steps``."""
    return r.kurtosis if metric == "kurtosis" else r.layer_series.get(metric, {})


def _seed_mean(runs: Sequence[RunRecord], metric: str = "kurtosis"
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:  # fmt: skip
    """Per-layer series of ``metric`` averaged over seeds, on the steps every seed logged."""
    if len(runs) == 1:
        return runs[0].kurt_steps, _layers(runs[0], metric)
    common = set(runs[0].kurt_steps.tolist())
    for r in runs[1:]:
        common &= set(r.kurt_steps.tolist())
    steps = np.array(sorted(common), dtype=np.int64)
    out = {}
    for p in _layers(runs[0], metric):
        rows = [_layers(r, metric)[p][np.searchsorted(r.kurt_steps, steps)] for r in runs
                if p in _layers(r, metric)]
        out[p] = np.nanmean(np.stack(rows), axis=0)
    return steps, out


def _has(r: RunRecord, metric: str) -> bool:
    return any(np.isfinite(v).any() for v in _layers(r, metric).values())


def _short(point: str) -> str:
    """A legend label: ``blocks.3.resid_post`` → ``blocks.3``, ``embed.resid_post`` → ``embed``."""
    return point.removesuffix(".resid_post").removesuffix(".attn")


def layers_vs_step(runs: Sequence[RunRecord], path: Path,
                   metrics: Sequence[tuple[str, str]]) -> Path | None:  # fmt: skip
    """Per-layer ``metrics`` ((field, axis label) pairs) vs step: one panel per configuration
    (seeds averaged) and metric, one line per layer coloured by depth, one y range per metric.
    None when no run logged any of them."""
    groups = [g for g in config_groups(runs) if any(_has(r, m) for r in g for m, _ in metrics)]
    if not groups:
        return None
    per_row = max(1, 4 // len(metrics))
    n = len(groups)
    rows, cols = math.ceil(n / per_row), len(metrics) * min(n, per_row)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    limits: dict[str, list[float]] = {m: [math.inf, -math.inf] for m, _ in metrics}
    used: list[tuple[plt.Axes, str]] = []
    cmap = plt.get_cmap("viridis")
    for i, g in enumerate(groups):
        for j, (metric, label) in enumerate(metrics):
            ax = axes[i // per_row, len(metrics) * (i % per_row) + j]
            ax.axis("on")
            used.append((ax, metric))
            steps, series = _seed_mean(g, metric)
            for k, (p, v) in enumerate(series.items()):
                ax.plot(steps, v, color=cmap(k / max(1, len(series) - 1)), lw=1.2, label=_short(p))
                if np.isfinite(v).any():
                    lim = limits[metric]
                    lim[:] = min(lim[0], float(np.nanmin(v))), max(lim[1], float(np.nanmax(v)))
            ax.set_title(f"{group_title(g)}: {label}", fontsize=8)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if i == 0 and series:
                ax.legend(fontsize=6, ncol=2, loc="best")
    for ax, metric in used:
        lo, hi = limits[metric]
        if math.isfinite(lo) and math.isfinite(hi):
            pad = 0.05 * (hi - lo) or 0.05 * abs(hi) or 0.05
            ax.set_ylim(lo - pad, hi + pad)
    fig.tight_layout()
    return _save(fig, path)


def kurtosis_vs_step(runs: Sequence[RunRecord], path: Path, pairs_per_row: int = 2) -> Path | None:
    """Per-layer Kurt vs step, one panel per configuration (shared axes), loss curves beside."""
    groups = config_groups(runs)
    if not groups:
        return None
    n = len(groups)
    rows = math.ceil(n / pairs_per_row)
    cols = 2 * min(n, pairs_per_row)
    fig, axes = plt.subplots(rows, cols, figsize=(3.3 * cols, 2.6 * rows), squeeze=False)
    kmax = max(float(np.nanmax(r.kurt_max_series)) for g in groups for r in g)
    use_log = kmax > 20
    lmin, lmax = math.inf, -math.inf
    for g in groups:
        for r in g:
            for arr in (r.loss, r.val_loss):
                if arr.size and np.isfinite(arr).any():
                    lmin = min(lmin, float(np.nanmin(arr)))
                    lmax = max(lmax, float(np.nanpercentile(arr, 98)))
    for i, g in enumerate(groups):
        ax_k = axes[i // pairs_per_row, 2 * (i % pairs_per_row)]
        ax_l = axes[i // pairs_per_row, 2 * (i % pairs_per_row) + 1]
        steps, series = _seed_mean(g)
        cmap = plt.get_cmap("viridis")
        for j, (p, v) in enumerate(series.items()):
            ax_k.plot(steps, v, color=cmap(j / max(1, len(series) - 1)), lw=1.2,
                      label=p.replace(".resid_post", ""))
        ax_k.set_title(group_title(g), fontsize=8)
        ax_k.set_ylim(0.9, kmax * 1.1 if not use_log else kmax * 1.5)
        if use_log:
            ax_k.set_yscale("log")
        ax_k.set_ylabel("Kurt", fontsize=8)
        ax_k.set_xlabel("step", fontsize=8)
        ax_k.tick_params(labelsize=7)
        for r in g:
            ax_l.plot(r.loss_steps, r.loss, color="0.6", lw=0.8)
            if r.val_loss.size:
                ax_l.plot(r.val_steps, r.val_loss, "o-", color=_colour(r.arch), ms=2, lw=1)
        if math.isfinite(lmin):
            ax_l.set_ylim(lmin * 0.97, lmax * 1.03)
        ax_l.set_title("loss (grey train, dots val)", fontsize=8)
        ax_l.set_xlabel("step", fontsize=8)
        ax_l.tick_params(labelsize=7)
        if i == 0:
            ax_k.legend(fontsize=6, ncol=2, loc="upper left")
    for j in range(n, rows * pairs_per_row):
        for c in (0, 1):
            if 2 * (j % pairs_per_row) + c < cols:
                axes[j // pairs_per_row, 2 * (j % pairs_per_row) + c].axis("off")
    # shared axes: one step range for every panel
    smax = max(int(r.kurt_steps.max()) for g in groups for r in g)
    for ax in axes.flat:
        ax.set_xlim(0, smax)
    fig.subplots_adjust(left=0.06, right=0.98, top=1 - 0.3 / (2.6 * rows),
                        bottom=0.5 / (2.6 * rows),
                        wspace=0.3, hspace=0.75)
    return _save(fig, path)


def _trend(runs: Sequence[RunRecord], field: str, path: Path, xlabel: str) -> Path | None:
    series = []
    for g in group_runs(runs, ignore=(field,)):
        by: dict[float, list[RunRecord]] = {}
        for r in g.runs:
            v = r.flat.get(field)
            if v is not None and math.isfinite(float(v)):
                by.setdefault(float(v), []).append(r)
        if len(by) >= 2:
            series.append((g, {x: Group(rs) for x, rs in sorted(by.items())}))
    if not series:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharex=True)
    for g, pts in series:
        xs = np.array(list(pts))
        lab = f"{g.first.arch} {g.first.optimizer}"
        if len(series) > len({(s.first.arch, s.first.optimizer) for s, _ in series}):
            other = "lr" if field != "optim.lr" else "eps"
            lab += f" {other}={g.first.flat.get('optim.' + other)}"
        for ax, metric in zip(axes, ("final_kurt_mean", "peak_kurt_mean")):
            mean = np.array([pts[x].mean(metric) for x in xs])
            lo = np.array([pts[x].values(metric).min() for x in xs])
            hi = np.array([pts[x].values(metric).max() for x in xs])
            ax.errorbar(xs, mean, yerr=[mean - lo, hi - mean], marker="o", capsize=3,
                        color=_colour(g.first.arch), label=lab,
                        ls="-" if g.first.optimizer == "adamw" else "--")
    for ax, title in zip(axes, ("final mean Kurt", "peak mean Kurt")):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sorted({x for _, p in series for x in p})))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel(xlabel)
        ax.set_title(title + " (bars: seed range)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("Kurt")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def kurtosis_vs_lr(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Final and peak mean Kurt vs learning rate, one line per block (science §3)."""
    return _trend(runs, "optim.lr", path, "learning rate")


def kurtosis_vs_eps(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Final and peak mean Kurt vs Adam ε, one line per block (science §3)."""
    return _trend(runs, "optim.eps", path, "Adam ε")


def kurtosis_by_optimizer(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Final mean Kurt of every configuration, grouped by optimiser, coloured by block."""
    groups = sorted(group_runs(runs), key=lambda g: (g.first.optimizer, g.first.arch))
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(7, 0.32 * len(groups) + 1.2))
    y = np.arange(len(groups))
    mean = np.array([g.mean() for g in groups])
    lo = np.array([g.values().min() for g in groups])
    hi = np.array([g.values().max() for g in groups])
    ax.barh(y, mean, xerr=[mean - lo, hi - mean], color=[_colour(g.first.arch) for g in groups],
            capsize=2)
    ax.set_yticks(y, [group_title(g.runs) for g in groups], fontsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("final mean Kurt (bars: seed range; 1 = no outlier features)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def cos_sim_vs_kurtosis(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """Signal propagation: final mean token cosine similarity vs final mean Kurt (science §1)."""
    pts = [r for r in runs if r.finished and math.isfinite(r.final_cos_sim)
           and math.isfinite(r.final_kurt_mean)]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for arch in dict.fromkeys(r.arch for r in pts):
        rs = [r for r in pts if r.arch == arch]
        ax.scatter([r.final_kurt_mean for r in rs], [r.final_cos_sim for r in rs],
                   color=_colour(arch), label=arch, s=22)
    rho = spearman([r.final_kurt_mean for r in pts], [r.final_cos_sim for r in pts])
    ax.set_xlabel("final mean Kurt")
    ax.set_ylabel("mean token cosine similarity")
    ax.set_title(f"signal propagation vs Kurt (Spearman ρ = {rho:+.2f}, n = {len(pts)})",
                 fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def quant_vs_kurtosis(runs: Sequence[RunRecord], path: Path) -> Path | None:
    """W8A8 perplexity increase (quant/FP − 1) vs final mean Kurt, one panel per scheme."""
    schemes = sorted({s for r in runs for s in r.quant})
    if not schemes:
        return None
    fig, axes = plt.subplots(1, len(schemes), figsize=(4.6 * len(schemes), 3.6), squeeze=False)
    for ax, s in zip(axes[0], schemes):
        pts = [r for r in runs if s in r.quant and r.finished and math.isfinite(r.final_kurt_mean)]
        for arch in dict.fromkeys(r.arch for r in pts):
            rs = [r for r in pts if r.arch == arch]
            ax.scatter([r.final_kurt_mean for r in rs],
                       [100 * r.quant[s].rel_increase for r in rs],
                       color=_colour(arch), label=arch, s=22)
        rho = spearman([r.final_kurt_mean for r in pts],
                       [r.quant[s].rel_increase for r in pts])
        ax.set_title(f"{s}: Spearman ρ = {rho:+.2f} (n = {len(pts)})", fontsize=9)
        ax.set_xlabel("final mean Kurt")
        ax.set_ylabel("perplexity increase (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


OPT_COLOURS = {"adamw": "tab:red", "soap": "tab:blue", "adafactor": "tab:orange",
               "shampoo": "tab:green"}


def frontier(runs: Sequence[RunRecord], path: Path, factor: str = "block") -> Path | None:
    """The Kurt–validation-loss frontier (:mod:`.frontier`), one panel per set of
    configurations equal but for ``factor``: each lr's seed-mean trajectory (thin; its final
    point a dot labelled with the lr) and each configuration's frontier (thick: the lowest
    Kurt over its lrs at each loss); the dotted line is the panel's matched loss L*. None
    without two configurations with held-out trajectories in one panel."""
    from outlierlab.experiments.frontier import panels

    ps = panels(runs, factor)
    if not ps:
        return None
    cols = min(len(ps), 2)
    rows = math.ceil(len(ps) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(ps):]:
        ax.axis("off")
    for ax, p in zip(axes.flat, ps):
        finals = [c.final[0] for cf in p.configs for c in cf.curves]
        lo, hi = min(cf.best_loss for cf in p.configs), max(finals)
        xmax = hi + 0.25 * (hi - lo) + 0.05
        kmax = 1.0
        for cf in p.configs:
            colour = (_colour(cf.name) if factor == "block"
                      else OPT_COLOURS.get(cf.name, "tab:gray"))
            for c in cf.curves:
                keep = c.loss <= xmax
                ax.plot(c.loss, c.kurt, "-", color=colour, lw=0.7, alpha=0.45)
                x, y = c.final
                ax.plot([x], [y], "o", color=colour, ms=4)
                ax.annotate(f"{c.lr:g}", (x, y), fontsize=6, xytext=(2, 2),
                            textcoords="offset points", color=colour)
                if keep.any():
                    kmax = max(kmax, float(np.nanmax(c.kurt[keep])))
            grid = np.linspace(cf.best_loss, xmax, 120)
            ax.plot(grid, [cf.at(v) for v in grid], "-", color=colour, lw=2.2,
                    label=f"{cf.name} frontier")
        ax.axvline(p.matched_loss, color="0.4", ls=":", lw=1)
        ax.set_xlim(lo - 0.02, xmax)
        if kmax > 5:  # a high-lr run's Kurt would flatten every frontier
            ax.set_yscale("log")
        ax.set_ylim(0.95, kmax * 1.08)
        ax.set_xlabel("validation loss (nats)", fontsize=8)
        ax.set_ylabel("held-out mean Kurt", fontsize=8)
        ax.set_title(p.title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


signal_propagation_vs_step = partial(
    layers_vs_step, metrics=(("cos_sim", "token cos-sim (ours)"),
                             ("corr_authors", "batch_corr_mean (authors)")))  # fmt: skip
mmr_vs_step = partial(layers_vs_step, metrics=(("mmr", "MMR"),))
attn_entropy_vs_step = partial(layers_vs_step, metrics=(("attn_entropy", "attention entropy"),))

FIGURES = (
    ("frontier_block", "Kurt–validation-loss frontier: OP vs Pre-Norm", partial(
        frontier, factor="block"),
     "Per optimiser, held-out mean Kurt against validation loss: thin lines are each lr's "
     "seed-mean trajectory over the evaluations (final point labelled with the lr), thick "
     "lines each block's frontier (the lowest Kurt over its lrs at each loss); a block is "
     "better where its frontier lies below. Dotted: the matched loss L* (the lowest loss every "
     "configuration reaches); the numbers are in the frontier table."),
    ("frontier_optimiser", "Kurt–validation-loss frontier: optimisers", partial(
        frontier, factor="optimiser"),
     "As above, per block, one frontier per optimiser."),
    ("kurtosis_vs_step", "Per-layer kurtosis during training", kurtosis_vs_step,
     "One panel per configuration, one line per measured layer (embedding output and each "
     "block's output), same axes everywhere; the training (grey) and validation loss beside."),
    ("kurtosis_vs_lr", "Kurtosis vs learning rate", kurtosis_vs_lr,
     "Final and peak mean kurtosis over layers, one line per block and optimiser."),
    ("kurtosis_vs_eps", "Kurtosis vs Adam ε", kurtosis_vs_eps,
     "Final and peak mean kurtosis over layers, one line per block and optimiser."),
    ("kurtosis_by_optimizer", "Kurtosis by optimiser", kurtosis_by_optimizer,
     "Final mean kurtosis of every configuration, colour = block."),
    ("signal_propagation_vs_step", "Signal propagation per layer during training",
     signal_propagation_vs_step,
     "The paper's signal-propagation figure: per configuration, our mean token cosine "
     "similarity (left) and the authors' batch_corr_mean (right; Gram of token-centred "
     "activations over their global mean square), one line per layer (colour = depth; "
     "high = towards rank collapse)."),
    ("mmr_vs_step", "Max-median ratio per layer during training", mmr_vs_step,
     "MMR (Eq. 2) of every measured layer against step, one panel per configuration."),
    ("attn_entropy_vs_step", "Attention entropy per layer during training", attn_entropy_vs_step,
     "Mean entropy (nats) of the causal attention distributions of each block, one panel per "
     "configuration; a fall towards 0 is the entropy collapse QK-Norm prevents in OP blocks."),
    ("cos_sim_vs_kurtosis", "Signal propagation vs kurtosis", cos_sim_vs_kurtosis,
     "Mean cosine similarity between token representations (high = towards rank collapse) "
     "against mean kurtosis, one dot per run."),
    ("quant_vs_kurtosis", "What outlier features cost: W8A8 perplexity increase", quant_vs_kurtosis,
     "Relative perplexity increase after W8A8 fake quantisation against mean kurtosis, "
     "one dot per run, one panel per scheme."),
)


def make_figures(runs: Sequence[RunRecord], out_dir: Path) -> list[tuple[str, str, str, Path]]:
    """Draw every figure the runs allow into ``out_dir``: (key, title, caption, path)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    made = []
    for key, title, fn, caption in FIGURES:
        p = fn(runs, out_dir / f"{key}.png")
        if p is not None:
            made.append((key, title, caption, p))
    return made
