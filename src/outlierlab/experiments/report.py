"""The report: one self-contained HTML page (figures embedded as base64 PNG, opens offline)
and the same content as Markdown (figures beside it as PNG files), plus ``results.json``.

Sections: the claims of science §5 and the ablations with computed verdicts, the pairs each
claim compared (the one field that differs, seeds, p), the results table (config, val loss, FP
and quantised perplexity per scheme, increase, mean/max Kurt), then the figures; when the runs
hold mitigation runs beside the Pre-LN + AdamW baseline, the mitigations leaderboard
(:mod:`.leaderboard`: also ``leaderboard.md``, ``.json`` and ``.png``).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import html
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from outlierlab import safe_io
from outlierlab.experiments import predictors as block_predictors
from outlierlab.experiments.claims import (
    ALPHA,
    HELD,
    INCONCLUSIVE,
    INDICATIVE,
    MIN_SEEDS,
    NOT_HELD,
    Claim,
    evaluate_claims,
    group_runs,
)
from outlierlab.experiments.figures import make_figures
from outlierlab.experiments.frontier import FACTORS, panels
from outlierlab.experiments.frontier import summary_rows as frontier_rows
from outlierlab.experiments.frontier import to_json as frontier_json
from outlierlab.experiments.leaderboard import has_mitigations, write_leaderboard
from outlierlab.experiments.leaderboard import markdown as leaderboard_md
from outlierlab.experiments.leaderboard import table as leaderboard_table
from outlierlab.experiments.mechanism import figure as mechanism_figure
from outlierlab.experiments.mechanism import site_tests, summary_lines
from outlierlab.experiments.mechanism import summary as mechanism_summary
from outlierlab.experiments.mechanism import table as mechanism_table
from outlierlab.experiments.results import RunRecord
from outlierlab.experiments.tables import html_table, md_table
from outlierlab.experiments.tuning import (
    Tuning,
    choose_lrs,
    is_tuning_sweep,
    mixed_seeds_note,
    write_tuning,
)
from outlierlab.experiments.tuning import markdown as tuning_md
from outlierlab.jsonable import to_number_or_str

VERDICT_MARK = {HELD: "✅ held", NOT_HELD: "❌ did not hold", INCONCLUSIVE: "❔ inconclusive",
                INDICATIVE: "❔ indicative only", "not tested": "– not tested"}
VERDICT_CLASS = {HELD: "held", NOT_HELD: "notheld", INCONCLUSIVE: "inconclusive",
                 INDICATIVE: "inconclusive"}
CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222}table{border-collapse:collapse;font-size:13px;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 7px;text-align:right}td:first-child,th:first-child{
text-align:left}th{background:#f3f3f3}.held{color:#176617;font-weight:bold}
.notheld{color:#a01010;font-weight:bold}.nottested{color:#777;font-weight:bold}
.inconclusive{color:#9a6700;font-weight:bold}.note{background:#fff8e0;padding:.5em 1em}
img{max-width:100%;border:1px solid #eee}details{margin:.3em 0 1em 1em;font-size:13px}
code{background:#f4f4f4;padding:1px 4px}"""


@dataclass
class Report:
    """Paths of a written report, and what went into it."""

    html: Path
    markdown: Path
    json: Path
    claims: list[Claim]
    runs: list[RunRecord]
    seeds_note: str = ""
    """The report's seed note as plain text ("" with 3 seeds or more)."""
    claim_sets: dict[str, list[Claim]] | None = None
    """With a tuning (``--tuning``): the claims at the shared lr and at each configuration's
    own lr, by section heading."""
    tuning: Tuning | None = None
    """The lrs this report's runs chose, when they are a tuning sweep (``tuning.md``)."""


def _fmt(x: Any, digits: int = 2) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            return "–"
        return f"{x:.{digits}f}"
    return "–" if x is None else str(x)


def results_table(runs: Sequence[RunRecord]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table, one row per run."""
    schemes = sorted({s for r in runs for s in r.quant})
    header = ["run", "block", "optimiser", "lr", "ε", "seed", "status", "steps", "val loss",
              "FP ppl"]
    for s in schemes:
        header += [f"{s} ppl", f"{s} increase"]
    header += ["init mean Kurt", "final mean Kurt", "final max Kurt", "Kurt from",
               "peak max Kurt", "tokens/s"]
    rows = []
    for r in runs:
        fp = next((q.fp_ppl for q in r.quant.values()), math.nan)
        row = [r.name, r.arch, r.optimizer, f"{r.lr:g}", f"{r.eps:g}", _fmt(r.seed), r.status,
               str(r.step), _fmt(r.final_val_loss, 3), _fmt(fp)]
        for s in schemes:
            q = r.quant.get(s)
            row += [_fmt(q.quant_ppl), f"{q.rel_increase:+.2%}"] if q else ["–", "–"]
        row += [_fmt(r.init_kurt_mean), _fmt(r.final_kurt_mean), _fmt(r.final_kurt_max),
                r.final_kurt.source or "–", _fmt(r.peak_kurt_max), _fmt(r.tokens_per_s, 0)]
        rows.append(row)
    return header, rows


def _verdict_html(v: str) -> str:
    cls = VERDICT_CLASS.get(v, "nottested")
    return f'<span class="{cls}">{html.escape(v)}</span>'


def pairs_table(claims: Sequence[Claim]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the pairs table: every pair (cell) a claim compared, with the one
    field in which the two configurations differ, their seed-mean Kurt, the seed pairs in the
    claimed direction, the cell's own sign-flip p (or the pair's rank-sum p) and its
    direction; the claim's verdict pools every cell (the claims table)."""
    header = ["claim", "field that differs", "reference", "compared", "Kurt (ref → compared)",
              "Kurt at matched loss", "seed pairs in direction", "p", "direction"]
    rows = []
    for c in claims:
        for e in c.evidence:
            if "field" not in e:
                continue
            verdict = e["verdict"] + (f" ({e['note']})" if e.get("note") else "")
            rows.append([c.key, e["field"], e["high"], e["low"],
                         f"{_fmt(e['kurt_high'])} → {_fmt(e['kurt_low'])}",
                         f"{_fmt(e['kurt_matched_high'])} → {_fmt(e['kurt_matched_low'])}"
                         if "kurt_matched_low" in e else "–",
                         f"{e['in_direction']} of {e['seeds']}",
                         _fmt(e.get("cell_p", e["p"]), 3), verdict])
    return header, rows


def seeds_note(runs: Sequence[RunRecord]) -> str:
    """What the number of seeds per configuration allows (one line, for the report's top)."""
    counts = [len(g.runs) for g in group_runs(runs, keep=lambda r: r.finished or r.diverged)]
    if not counts:
        return ""
    lo, hi = min(counts), max(counts)
    span = str(lo) if lo == hi else f"{lo}–{hi}"
    if lo >= MIN_SEEDS:
        return f"{span} seeds per configuration."
    if hi >= MIN_SEEDS:
        return (f"{span} seed(s) per configuration: a comparison with fewer than {MIN_SEEDS} "
                "seeds reads *indicative only*.")
    return (f"**{span} seed(s) per configuration: the verdicts are indicative only.** A claim "
            f"gets a verdict only with {MIN_SEEDS} or more seeds, so directions seen here are "
            f"shown as *indicative only*; run the `cpu` preset ({MIN_SEEDS} seeds) for "
            "verdicts.")


def own_lr_runs(runs: Sequence[RunRecord]) -> list[RunRecord]:
    """The runs with their lr replaced by ``"own"`` in the config, so that claims pair
    configurations across lrs (each run being at its configuration's own lr)."""
    return [dataclasses.replace(r, config={**r.config, "optim": {**r.config.get("optim", {}),
                                                                 "lr": "own"}})
            for r in runs]


def lr_claim_sets(runs: Sequence[RunRecord], tuning: Tuning,
                  loss_tol: float = 0.05) -> tuple[dict[str, list[Claim]], list[str]]:
    """The claims at the tuning's shared lr (pairs within that lr) and at each configuration's
    own lr (a configuration's runs at its own lr, paired across lrs: the lr is taken out of
    the pairing), by section heading, and notes on what was left out."""
    sets, notes = {}, []
    untuned = sorted({r.name for r in runs if tuning.own_lr(r) is None})
    if untuned:
        first = next(r for r in runs if r.name == untuned[0])
        notes.append(f"{len(untuned)} run(s) of configurations the tuning did not cover, "
                     f"left out of the own-lr claims: {', '.join(untuned[:6])}"
                     + (", ..." if len(untuned) > 6 else "")
                     + f" ({untuned[0]} differs from the nearest tuned configuration in "
                     + ", ".join(tuning.differences(first)[:5]) + ")")
    shared = tuning.shared_lr
    heading = f"Claims at the shared lr {shared:g}" if shared is not None else ""
    if shared is None:
        notes.append(f"no shared lr: {tuning.shared_why}")
        shared = tuning.nearest_lr
        if shared is not None:
            heading = (f"Claims at the nearest shared lr {shared:g} (no lr has every "
                       f"configuration within {tuning.tolerance:.0%} of its best; worst gap "
                       f"here {tuning.nearest_gap:+.1%}, {tuning.nearest_worst})")
    if shared is not None:
        at = [r for r in runs if math.isclose(r.lr, shared, rel_tol=1e-9)]
        sets[heading] = evaluate_claims(at, loss_tol)
    own = own_lr_runs([r for r in runs if (lr := tuning.own_lr(r)) is not None
                       and math.isclose(r.lr, lr, rel_tol=1e-9)])
    lrs = "; ".join(f"{c.label} {c.own_lr:g}" for c in tuning.configurations
                    if c.own_lr is not None)
    sets[f"Claims at each configuration's own lr ({lrs})"] = evaluate_claims(own, loss_tol)
    return sets, notes


def write_report(runs: Sequence[RunRecord], out_dir: str | Path, *, title: str = "",
                 command: str = "", loss_tol: float = 0.05,
                 tuning: Tuning | None = None, own_lr_from: str | None = None) -> Report:
    """Evaluate the claims, draw the figures and write ``report.html``, ``report.md``,
    ``results.json`` and ``figures/*.png`` into ``out_dir``; the frontier table also as
    ``frontier.json``. When the runs are a tuning sweep (tuning seeds, lr series:
    :func:`~.tuning.is_tuning_sweep`), the chosen lrs go to ``tuning.md``/``.json``; with
    ``tuning`` (a tuning sweep's choice) the claims are also tested at its shared lr and at
    each configuration's own lr (:func:`lr_claim_sets`); with ``own_lr_from`` (the runs are at
    lrs that tuning sweep chose, one per configuration: a grid's ``own_lr_from``) the claims
    pair configurations across lrs (:func:`own_lr_runs`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = list(runs)
    claims = evaluate_claims(own_lr_runs(runs) if own_lr_from else runs, loss_tol=loss_tol)
    chosen = None
    if is_tuning_sweep(runs):
        chosen = choose_lrs(runs)
        write_tuning(chosen, out)
    sets, set_notes = lr_claim_sets(runs, tuning, loss_tol) if tuning else ({}, [])
    if mixed := mixed_seeds_note(runs):
        set_notes.insert(0, mixed)
    front = [p for f in FACTORS for p in panels(runs, f)]
    if front:
        safe_io.write_text(out / "frontier.json", json.dumps(frontier_json(front), indent=1))
    figures = make_figures(runs, out / "figures")
    title = title or "outlierlab report: outlier features in these runs"
    n_fin = sum(r.finished for r in runs)
    n_div = sum(r.diverged for r in runs)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    intro = (f"{len(runs)} runs ({n_fin} finished, {n_div} diverged, "
             f"{len(runs) - n_fin - n_div} other), written {when}."
             + (f" Made by `{command}`." if command else "")
             + (f" Each configuration runs at its own lr, chosen by the `{own_lr_from}` tuning "
                "sweep on seeds ≥ 100 (lowest validation loss); the claims pair configurations "
                "across lrs (the lr is not a field under test)." if own_lr_from else ""))
    about = ("Kurtosis is Kurt = mean_j(s_j⁴)/mean_j(s_j²)² of the neuron RMS s_j over tokens "
             "(He et al. 2024, Eq. 1): 1 when every neuron has the same scale, up to the width "
             "when one neuron carries everything. *Mean*/*max* are over the measured layers "
             "(embedding and block outputs); *final* is measured on the fixed held-out "
             "validation windows at the last step (column *held-out*; else the last training "
             "batch measured), *init* at step 0, *peak* is the largest over training. A claim "
             "compares two configurations only if their full resolved configs are equal except "
             "the seed and the field under test (the pairs table names it); otherwise it says "
             "*not tested: runs differ in X*. A claim is a main effect over every *cell* (pair of "
             "configurations) where its field varies; its outcome is each run's Kurt growth "
             "Kurt − Kurt₀ from step 0 (free of the starting offset; final Kurt "
             "where a run lacks step 0). The stratified same-seed sign-flip permutation test "
             "over all cells gives the one-sided p: the claim *held* when p ≤ "
             f"{ALPHA}, *did not hold* only when p ≤ {ALPHA} the other way, else it is "
             f"*inconclusive*; *indicative only* with fewer than {MIN_SEEDS} seeds. No pair "
             "is left out because of its outcome. OP vs Pre-Norm and the optimiser pairs are "
             "compared at *matched validation loss*: per same-seed pair, each run's Kurt "
             "interpolated along its trajectory of evaluations at the worse of the two final "
             "losses (never extrapolated; runs without a held-out trajectory are compared at "
             f"their ends, an OP cell more than {loss_tol:.0%} worse in loss flagged).")
    note = seeds_note(runs)
    parts = (title, intro, note, about, claims, runs, figures)
    md, page = _markdown(*parts), _html(*parts)
    extra = _extra_sections(chosen, sets, set_notes, front)
    md = md.replace("\n## Results\n", "\n" + "\n".join(m for m, _ in extra) + "\n## Results\n", 1)
    page = page.replace("<h2>Results</h2>", "".join(h for _, h in extra) + "<h2>Results</h2>",
                        1)
    tests = site_tests(runs)  # the per-tensor test of the quantisation claim
    mech = mechanism_summary(tests)
    if tests:
        fig = mechanism_figure(tests, out / "figures" / "kurt_vs_sqnr.png")
        md_part, html_part = _mechanism(tests, mech, fig)
        md += md_part
        page = page.replace("</body></html>", html_part + "</body></html>")
    found = block_predictors.gather(runs)  # issue 22: which measurement predicts the damage
    pred_rows = block_predictors.summary(found)
    if pred_rows:
        fig = block_predictors.figure(found, out / "figures" / "predictors.png")
        md_part, html_part = _predictors(pred_rows, fig)
        md += md_part
        page = page.replace("</body></html>", html_part + "</body></html>")
    if has_mitigations(runs):  # issue 25: leaderboard.md/.json/.png beside the report
        entries, paths = write_leaderboard(runs, out, command, when)
        md += ("\n## Mitigations leaderboard\n\n" + leaderboard_md(entries, command, when)
               + "\n![leaderboard](leaderboard.png)\n")
        header, rows = leaderboard_table(entries)
        img = ""
        if "png" in paths:
            data = base64.b64encode(paths["png"].read_bytes()).decode()
            img = f"<img alt='leaderboard' src='data:image/png;base64,{data}'>"
        page = page.replace("</body></html>", "<h2>Mitigations leaderboard</h2>"
                            + html_table(header, rows)
                            + img + "</body></html>")
    safe_io.write_text(out / "report.md", md)
    safe_io.write_text(out / "report.html", page)
    summary = {"title": title, "written": when, "command": command, "seeds_note": note,
               "claims": [c.to_dict() for c in claims], "runs": [_run_summary(r) for r in runs],
               "claim_sets": {k: [c.to_dict() for c in v] for k, v in sets.items()},
               "tuning": chosen.to_dict() if chosen else None,
               "frontier": frontier_json(front),
               "mechanism": {"summary": mech,
                             "runs": [{"run": t.run, "scheme": t.scheme, "tensors": t.n,
                                       "rho_kurt": t.rho_kurt, "rho_mmr": t.rho_mmr}
                                      for t in tests]},
               "predictors": pred_rows}
    safe_io.write_text(out / "results.json",
                       json.dumps(summary, indent=1, default=to_number_or_str))
    return Report(out / "report.html", out / "report.md", out / "results.json", claims, runs,
                  note.replace("**", "").replace("`", ""), sets or None, chosen)


def _claims_md(claims: Sequence[Claim]) -> list[str]:
    md = [md_table(["claim", "verdict", "numbers"],
                   [[c.statement, VERDICT_MARK.get(c.verdict, c.verdict), c.summary]
                    for c in claims]), ""]
    for c in claims:
        md += [f"**{c.statement}** — {c.verdict}. {c.summary}", ""]
        md += [f"- {d}" for d in c.details] + [""]
    return md


def _claims_html(claims: Sequence[Claim]) -> list[str]:
    h = [html_table(["claim", "verdict", "numbers"],
                    [[html.escape(c.statement), _verdict_html(c.verdict), html.escape(c.summary)]
                     for c in claims], raw=True)]
    for c in claims:
        items = "".join(f"<li>{html.escape(d)}</li>" for d in c.details)
        h.append(f"<details><summary>{html.escape(c.statement)} — {_verdict_html(c.verdict)}"
                 f"</summary><ul>{items}</ul></details>")
    return h


def _extra_sections(chosen: Tuning | None, sets: dict[str, list[Claim]], notes: list[str],
                    front: list) -> list[tuple[str, str]]:
    """(Markdown, HTML) of the lr tuning, the claims at the shared/own lr and the frontier
    table, placed before the results table."""
    out = []
    if chosen is not None:
        body = tuning_md(chosen).replace("# lr tuning\n", "", 1).replace("## ", "### ")
        out.append(("## lr tuning (tuning.md, tuning.json)\n" + body,
                    "<h2>lr tuning</h2><p>See <code>tuning.md</code>: shared lr "
                    + html.escape("none" if chosen.shared_lr is None else
                                  f"{chosen.shared_lr:g}")
                    + "; own lr: " + html.escape("; ".join(
                        f"{c.label} {'–' if c.own_lr is None else format(c.own_lr, 'g')}"
                        for c in chosen.configurations)) + "</p>"))
    for n in notes:
        out.append((f"*{n}*\n", f"<p class='note'>{html.escape(n)}</p>"))
    for heading, claims in sets.items():
        pair_header, pair_rows = pairs_table(claims)
        md = [f"## {heading}", "", *_claims_md(claims)]
        md += [md_table(pair_header, pair_rows), ""] if pair_rows else []
        h = [f"<h2>{html.escape(heading)}</h2>", *_claims_html(claims)]
        h += [html_table(pair_header, pair_rows)] if pair_rows else []
        out.append(("\n".join(md), "".join(h)))
    if front:
        header, rows = frontier_rows(front)
        intro = ("Per panel (configurations equal but for the block, or the optimiser), each "
                 "configuration's frontier: the lowest held-out mean Kurt any of its lrs' "
                 "seed-mean trajectories has at that validation loss (lr in brackets; – where "
                 "none reaches it). L* is the worst of the panel's best losses, the lowest loss "
                 "every configuration reaches. Lower is better. Also in frontier.json.")
        out.append(("## Kurt–validation-loss frontier\n\n" + intro + "\n\n"
                    + md_table(header, rows) + "\n",
                    f"<h2>Kurt–validation-loss frontier</h2><p>{html.escape(intro)}</p>"
                    + html_table(header, rows)))
    return out


MECHANISM_ABOUT = (
    "Within each run, every quantised tensor's Kurt (science §1 Eq. 1) and max/median (Eq. 2) "
    "against its activation SQNR (dB): if outlier features are what int8 loses, the tensors "
    "with the larger Kurt have the lower SQNR, ρ < 0. `w8a8-tensor` quantises linear inputs "
    "(for Pre-LN the LN outputs); `w8a8-paper` every site of Bondarenko et al. with a feature "
    "dimension, the residual stream included (its Kurt as the FP model has it). Across runs one "
    "point per configuration (the mean of its seeds' ρ) and the exact one-sided sign test of "
    "ρ < 0 over configurations.")


def _mechanism(tests: Sequence[Any], mech: Sequence[dict[str, Any]],
               fig: Path | None) -> tuple[str, str]:
    """The per-tensor section, as Markdown and as HTML."""
    header, rows = mechanism_table(tests)
    lines = summary_lines(mech)
    md = ["", "## Per tensor: Kurt against SQNR (the quantisation claim's mechanism)", "",
          MECHANISM_ABOUT, ""] + [f"- {x}" for x in lines] + ["", md_table(header, rows), ""]
    h = ["<h2>Per tensor: Kurt against SQNR (the quantisation claim's mechanism)</h2>",
         f"<p>{html.escape(MECHANISM_ABOUT.replace('`', ''))}</p><ul>"
         + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>",
         html_table(header, rows)]
    _add_figure(md, h, fig, "Kurt against SQNR")
    return "\n".join(md), "\n".join(h)


def _add_figure(md: list[str], h: list[str], fig: Path | None, alt: str) -> None:
    """Append ``fig`` (a PNG under ``figures/``) to a section's Markdown and, inlined, its HTML."""
    if fig is not None:
        md += [f"![{alt}](figures/{fig.name})", ""]
        data = base64.b64encode(fig.read_bytes()).decode()
        h.append(f"<img alt='{html.escape(alt)}' src='data:image/png;base64,{data}'>")


def _predictors(rows: Sequence[dict[str, Any]], fig: Path | None) -> tuple[str, str]:
    """The across-runs predictor section, as Markdown and as HTML."""
    header, body = block_predictors.table(rows)
    title = "Which measurement predicts a block's quantisation damage, across runs"
    md = ["", f"## {title}", "", block_predictors.ABOUT, "", md_table(header, body), ""]
    h = [f"<h2>{title}</h2>",
         f"<p>{html.escape(block_predictors.ABOUT.replace('`', ''))}</p>",
         html_table(header, body)]
    _add_figure(md, h, fig, "predictors")
    return "\n".join(md), "\n".join(h)


def _markdown(title: str, intro: str, note: str, about: str, claims: Sequence[Claim],
              runs: Sequence[RunRecord], figures: list) -> str:
    """``report.md``: intro, claims with their details, the pairs, the results table, figures."""
    header, rows = results_table(runs)
    pair_header, pair_rows = pairs_table(claims)
    md = [f"# {title}", "", intro, "", note, "", about, "", "## Claims (science §5, ablations)",
          "", md_table(["claim", "verdict", "numbers"],
                        [[c.statement, VERDICT_MARK.get(c.verdict, c.verdict), c.summary]
                         for c in claims]), ""]
    for c in claims:
        md += [f"**{c.statement}** — {c.verdict}. {c.summary}", ""]
        md += [f"- {d}" for d in c.details] + [""]
    md += ["## Pairs compared", "", md_table(pair_header, pair_rows) if pair_rows
           else "No pair of configurations differs in one field only.", ""]
    md += ["## Results", "", md_table(header, rows), "", "## Figures", ""]
    for _key, ftitle, caption, path in figures:
        md += [f"### {ftitle}", "", caption, "", f"![{ftitle}](figures/{path.name})", ""]
    return "\n".join(md)


def _html(title: str, intro: str, note: str, about: str, claims: Sequence[Claim],
          runs: Sequence[RunRecord], figures: list) -> str:
    """``report.html``: the same as :func:`_markdown`, one offline page (figures inlined)."""
    header, rows = results_table(runs)
    pair_header, pair_rows = pairs_table(claims)
    h = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>"
         f"{html.escape(title)}</title><style>{CSS}</style></head><body>",
         f"<h1>{html.escape(title)}</h1><p>{html.escape(intro)}</p>"
         + (f"<p class='note'>{html.escape(note.replace('**', '').replace('`', ''))}</p>"
            if note else "")
         + f"<p>{html.escape(about.replace('*', ''))}</p>", "<h2>Claims (§5, ablations)</h2>",
         *_claims_html(claims)]
    h += ["<h2>Pairs compared</h2>", html_table(pair_header, pair_rows) if pair_rows
          else "<p>No pair of configurations differs in one field only.</p>"]
    h += ["<h2>Results</h2>", html_table(header, rows), "<h2>Figures</h2>"]
    for _key, ftitle, caption, path in figures:
        data = base64.b64encode(path.read_bytes()).decode()
        h.append(f"<h3>{html.escape(ftitle)}</h3><p>{html.escape(caption)}</p>"
                 f"<img alt='{html.escape(ftitle)}' src='data:image/png;base64,{data}'>")
    h.append("</body></html>")
    return "\n".join(h)


def _run_summary(r: RunRecord) -> dict[str, Any]:
    """One run's row of ``results.json``."""
    return {"name": r.name, "path": str(r.path), "status": r.status, "step": r.step,
            "arch": r.arch, "optimizer": r.optimizer, "lr": r.lr, "eps": r.eps, "seed": r.seed,
            "val_loss": r.final_val_loss, "final_kurt_mean": r.final_kurt_mean,
            "final_kurt_max": r.final_kurt_max, "held_out": r.held_out,
            "kurt_from": r.final_kurt.source,
            "init_kurt_mean": r.init_kurt_mean, "peak_kurt_max": r.peak_kurt_max,
            "final_cos_sim": r.final_cos_sim, "tokens_per_s": r.tokens_per_s,
            "quant": {s: {"fp_ppl": q.fp_ppl, "quant_ppl": q.quant_ppl}
                      for s, q in r.quant.items()}}
