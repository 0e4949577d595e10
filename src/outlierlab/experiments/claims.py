"""The paper's claims (SPEC §5, last bullet) evaluated on a set of runs.

Each claim compares runs that differ only in the field the claim is about (seeds pooled:
the value of a configuration is the mean over its seeds, the spread is their min–max).
Verdicts are computed, never written down: ``held``, ``did not hold`` or ``not tested``
(the runs needed to test it are missing). Kurtosis is the final mean over layers of
Kurt = mean_j s_j⁴ / (mean_j s_j²)² (SPEC §1, Eq. 1).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from outlierlab.experiments.results import RunRecord
from outlierlab.optim import hyperparameters

HELD, NOT_HELD, NOT_TESTED = "held", "did not hold", "not tested"
SIZE_KEYS = ("model.vocab_size", "model.n_layer", "model.d_model", "model.n_head",
             "model.d_mlp", "model.seq_len")
PRIMARY_SCHEMES = ("w8a8-tensor", "w8a8-dynamic")
MIN_KURT = 1.5
"""A comparison tests a claim about *lowering* OFs only where the reference run (Pre-Norm,
AdamW, the series' largest value) has some: Kurt ≥ this. Near 1 (≈ initialisation, SPEC §6's
gentle settings give 1.1–1.3) there is nothing to lower and differences are noise."""
OPTIMISER_SPECIFIC = ("optim.name", *(f"optim.{k}" for k in hyperparameters()
                                       if k not in ("lr", "eps")))
"""Keys that differ between optimisers run at their own defaults: the name and every
hyperparameter the registry declares (:func:`outlierlab.optim.hyperparameters`) except lr and
ε, which the claims compare explicitly."""


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties get their average rank (as ``scipy.stats.rankdata``)."""
    a = np.asarray(x, dtype=float)
    order = np.argsort(a, kind="mergesort")
    ranks = np.empty(len(a))
    sorted_a = a[order]
    i = 0
    while i < len(a):
        j = i
        while j + 1 < len(a) and sorted_a[j + 1] == sorted_a[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman rank correlation: Pearson correlation of the ranks (nan if a side is constant)."""
    if len(x) != len(y) or len(x) < 2:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx**2).sum() * (ry**2).sum()))
    return float((rx * ry).sum() / den) if den > 0 else math.nan


def permutation_p(x: Sequence[float], y: Sequence[float], n_perm: int = 20000,
                  seed: int = 0) -> float:
    """One-sided p-value of ρ ≥ observed under random pairing (exact for n ≤ 8)."""
    rho = spearman(x, y)
    if not math.isfinite(rho):
        return math.nan
    y = np.asarray(y, dtype=float)
    if len(y) <= 8:
        perms = (list(p) for p in itertools.permutations(range(len(y))))
        vals = [spearman(x, y[p]) for p in perms]
    else:
        rng = np.random.default_rng(seed)
        vals = [spearman(x, y[rng.permutation(len(y))]) for _ in range(n_perm)]
    vals = np.nan_to_num(np.array(vals), nan=-2.0)
    return float(np.mean(vals >= rho - 1e-12))


@dataclass
class Group:
    """Runs of one configuration (all seeds)."""

    runs: list[RunRecord]

    @property
    def first(self) -> RunRecord:
        return self.runs[0]

    def values(self, metric: str = "final_kurt_mean") -> np.ndarray:
        v = np.array([getattr(r, metric) for r in self.runs], dtype=float)
        return v[np.isfinite(v)]

    def mean(self, metric: str = "final_kurt_mean") -> float:
        v = self.values(metric)
        return float(v.mean()) if v.size else math.nan

    def loss(self) -> float:
        """Seed-mean final validation loss (final training loss if no validation)."""
        m = self.mean("final_val_loss")
        return m if math.isfinite(m) else self.mean("final_loss")

    def describe(self, metric: str = "final_kurt_mean") -> str:
        """``3.90 (3.71–4.09, 2 seeds)`` or ``3.90 (1 seed)``."""
        v = self.values(metric)
        if not v.size:
            return "n/a"
        if v.size == 1:
            return f"{v[0]:.2f} (1 seed)"
        return f"{v.mean():.2f} ({v.min():.2f}–{v.max():.2f}, {v.size} seeds)"

    def label(self, fields: Sequence[str] = (), arch: bool = True) -> str:
        """``pre-ln adamw lr=0.01``: block, optimiser and the given config fields."""
        r = self.first
        parts = [r.arch] if arch else []
        parts += [r.optimizer] + [f"{f.rsplit('.', 1)[-1]}={r.flat.get(f)}" for f in fields]
        return " ".join(parts)


@dataclass
class Claim:
    """One claim's verdict and the numbers behind it."""

    key: str
    statement: str
    verdict: str
    summary: str
    details: list[str] = field(default_factory=list)
    evidence: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"key": self.key, "statement": self.statement, "verdict": self.verdict,
                "summary": self.summary, "details": self.details, "evidence": self.evidence}


def group_runs(runs: Sequence[RunRecord], ignore: tuple[str, ...] = ()) -> list[Group]:
    """Finished runs grouped by config (seeds pooled), in first-seen order."""
    groups: dict[Any, Group] = {}
    for r in runs:
        if r.finished and math.isfinite(r.final_kurt_mean):
            groups.setdefault(r.identity(ignore), Group([])).runs.append(r)
    return list(groups.values())


def _varying(groups: Sequence[Group]) -> list[str]:
    """Config keys (other than block and optimiser name) that differ between groups."""
    flats = [dict(g.first.identity()) for g in groups]
    keys = list(dict.fromkeys(k for f in flats for k in f))
    return [k for k in keys if k not in OPTIMISER_SPECIFIC and not k.startswith("model.")
            and any(f.get(k) != flats[0].get(k) for f in flats)]


def _arch_keys(run: RunRecord) -> tuple[str, ...]:
    return tuple(k for k in run.flat if k.startswith("model.") and k not in SIZE_KEYS)


def _pairs(groups: Sequence[Group], side_a: Callable[[Group], bool],
           side_b: Callable[[Group], bool], ignore: tuple[str, ...]) -> list[tuple[Group, Group]]:
    out = []
    for a in groups:
        if not side_a(a):
            continue
        for b in groups:
            if side_b(b) and a.first.identity(ignore) == b.first.identity(ignore):
                out.append((a, b))
    return out


def _diverged_note(runs: Sequence[RunRecord]) -> list[str]:
    bad = [r.name for r in runs if r.diverged]
    return [f"left out, diverged: {', '.join(bad)}"] if bad else []


def claim_op_vs_prenorm(runs: Sequence[RunRecord], loss_tol: float = 0.05,
                        min_kurt: float = MIN_KURT) -> Claim:
    """OP has lower Kurt than Pre-Norm at matched loss (SPEC §5). A pair counts when the OP
    run's loss is at most ``loss_tol`` (relative) above the Pre-Norm run's: lower kurtosis
    bought with a worse model would not count, a better OP model only strengthens the claim.
    Pairs whose Pre-Norm run has Kurt < ``min_kurt`` (no OFs to remove) are left out."""
    statement = "The OP block has lower kurtosis than Pre-Norm blocks at matched loss."
    groups = group_runs(runs)
    arch = tuple({k for g in groups for k in _arch_keys(g.first)})
    pairs = _pairs(groups, lambda g: g.first.arch.startswith("op"),
                   lambda g: g.first.arch.startswith("pre-"), arch)
    if not pairs:
        return Claim("op_vs_prenorm", statement, NOT_TESTED,
                     "needs an OP run and a Pre-Norm run that differ only in the block",
                     _diverged_note(runs))
    details, evidence, matched = [], [], []
    labels = _varying(groups)
    for op, pre in pairs:
        lo, lp = op.loss(), pre.loss()
        ok = lo <= lp + loss_tol * abs(lp)
        has_ofs = pre.mean() >= min_kurt
        lower = op.mean() < pre.mean()
        ctx = pre.label(labels, arch=False)
        details.append(f"{ctx}: {pre.first.arch} {pre.describe()} vs {op.first.arch} "
                       f"{op.describe()}; loss {lp:.3f} vs {lo:.3f}"
                       + ("" if ok else f" (OP loss > {loss_tol:.0%} worse: left out)")
                       + ("" if has_ofs or not ok else
                          f" (no OFs in Pre-Norm, Kurt < {min_kurt}: left out)"))
        ok = ok and has_ofs
        evidence.append({"prenorm": pre.first.name, "op": op.first.name,
                         "kurt_prenorm": pre.mean(), "kurt_op": op.mean(),
                         "loss_prenorm": lp, "loss_op": lo, "matched": ok, "op_lower": lower})
        if ok:
            matched.append(lower)
    if not matched:
        return Claim("op_vs_prenorm", statement, NOT_TESTED,
                     f"no pair at matched loss (OP loss within {loss_tol:.0%} of Pre-Norm's "
                     f"or better) where Pre-Norm has OFs (Kurt ≥ {min_kurt})",
                     details + _diverged_note(runs), evidence)
    n_low = sum(matched)
    verdict = HELD if n_low == len(matched) else NOT_HELD
    ratios = [e["kurt_prenorm"] / e["kurt_op"] for e in evidence if e["matched"]]
    summary = (f"OP lower in {n_low} of {len(matched)} pair(s) at matched loss with OFs; "
               f"Pre-Norm/OP Kurt ratio {min(ratios):.2f}–{max(ratios):.2f}")
    return Claim("op_vs_prenorm", statement, verdict, summary,
                 details + _diverged_note(runs), evidence)


def _trend_claim(runs: Sequence[RunRecord], key: str, field_name: str, sign: int,
                 statement: str, word: str, min_kurt: float = MIN_KURT) -> Claim:
    groups = group_runs(runs, ignore=(field_name,))
    series = []
    for g in groups:
        by_value: dict[float, list[RunRecord]] = {}
        for r in g.runs:
            v = r.flat.get(field_name)
            by_value.setdefault(float(v) if v is not None else math.nan, []).append(r)
        by_value = {v: rs for v, rs in by_value.items() if math.isfinite(v)}
        if len(by_value) >= 2:
            series.append((g, {v: Group(rs) for v, rs in sorted(by_value.items())}))
    if not series:
        return Claim(key, statement, NOT_TESTED,
                     f"needs runs that differ only in {field_name} (two values or more)",
                     _diverged_note(runs))
    details, evidence, good = [], [], []
    labels = [k for k in _varying([g for g, _ in series]) if k != field_name]
    for g, pts in series:
        xs = list(pts)
        ys = [pts[x].mean() for x in xs]
        rho = spearman(xs, ys)
        ok = math.isfinite(rho) and sign * rho > 0
        vals = ", ".join(f"{word} {x:g}: {pts[x].describe()}" for x in xs)
        if max(ys) < min_kurt:
            details.append(f"{g.label(labels)}: {vals}; no OFs (Kurt < {min_kurt}): left out")
            continue
        good.append(ok)
        details.append(f"{g.label(labels)}: {vals}; ρ = {rho:+.2f}")
        evidence.append({"series": g.label(labels), "values": xs, "kurt": ys, "rho": rho,
                         "ok": ok})
    if not good:
        return Claim(key, statement, NOT_TESTED,
                     f"no {word} series reaches Kurt ≥ {min_kurt} (no OFs to change)",
                     details + _diverged_note(runs), evidence)
    verdict = HELD if all(good) else NOT_HELD
    rhos = [e["rho"] for e in evidence if max(e["kurt"]) >= min_kurt]
    summary = (f"{'lower' if sign > 0 else 'larger'} {word} → lower Kurt in {sum(good)} of "
               f"{len(good)} series; Spearman ρ({word}, Kurt) {min(rhos):+.2f} to "
               f"{max(rhos):+.2f}")
    return Claim(key, statement, verdict, summary, details + _diverged_note(runs), evidence)


def claim_lr(runs: Sequence[RunRecord]) -> Claim:
    """Lower learning rate → lower Kurt (SPEC §3, §5): ρ(lr, Kurt) > 0 in every series."""
    return _trend_claim(runs, "lower_lr", "optim.lr", +1,
                        "A lower learning rate gives lower kurtosis.", "lr")


def claim_eps(runs: Sequence[RunRecord]) -> Claim:
    """Larger Adam ε → lower Kurt (SPEC §3, §5): ρ(ε, Kurt) < 0 in every series."""
    return _trend_claim(runs, "larger_eps", "optim.eps", -1,
                        "A larger Adam ε gives lower kurtosis.", "ε")


def claim_soap(runs: Sequence[RunRecord]) -> Claim:
    """SOAP has lower Kurt than AdamW (SPEC §3, §5). Pairs differ only in ``optim.name``;
    if there are none, in the name and the hyperparameters each optimiser sets to its own
    defaults (betas, weight decay, …) but not in lr or ε; failing that, each at its own lr and
    ε (the recipes compared as the paper does; the details name both lrs)."""
    statement = "SOAP gives lower kurtosis than AdamW."
    groups = group_runs(runs)
    pairs = []
    for ignore in (("optim.name",), OPTIMISER_SPECIFIC,
                   (*OPTIMISER_SPECIFIC, "optim.lr", "optim.eps")):
        pairs = _pairs(groups, lambda g: g.first.optimizer == "soap",
                       lambda g: g.first.optimizer == "adamw", ignore)
        if pairs:
            break
    if not pairs:
        return Claim("soap_vs_adamw", statement, NOT_TESTED,
                     "needs a SOAP run and an AdamW run that differ only in the optimiser",
                     _diverged_note(runs))
    details, evidence = [], []
    for soap, adam in pairs:
        lower = soap.mean() < adam.mean()
        if adam.mean() < MIN_KURT:
            details.append(f"{adam.first.arch} lr={adam.first.lr:g}: AdamW {adam.describe()} vs "
                           f"SOAP {soap.describe()}; no OFs with AdamW (Kurt < {MIN_KURT}): "
                           "left out")
            continue
        lrs = (f"lr={adam.first.lr:g}" if adam.first.lr == soap.first.lr
               else f"lr {adam.first.lr:g} vs {soap.first.lr:g}")
        details.append(f"{adam.first.arch} {lrs}: AdamW {adam.describe()} vs "
                       f"SOAP {soap.describe()}; loss {adam.loss():.3f} vs {soap.loss():.3f}")
        evidence.append({"adamw": adam.first.name, "soap": soap.first.name,
                         "kurt_adamw": adam.mean(), "kurt_soap": soap.mean(),
                         "soap_lower": lower})
    if not evidence:
        return Claim("soap_vs_adamw", statement, NOT_TESTED,
                     f"no AdamW run with OFs (Kurt ≥ {MIN_KURT}) to compare SOAP with",
                     details + _diverged_note(runs))
    n_low = sum(e["soap_lower"] for e in evidence)
    verdict = HELD if n_low == len(evidence) else NOT_HELD
    ratios = [e["kurt_adamw"] / e["kurt_soap"] for e in evidence]
    summary = (f"SOAP lower in {n_low} of {len(evidence)} pair(s); AdamW/SOAP Kurt ratio "
               f"{min(ratios):.2f}–{max(ratios):.2f}")
    return Claim("soap_vs_adamw", statement, verdict, summary,
                 details + _diverged_note(runs), evidence)


def claim_quant(runs: Sequence[RunRecord], min_runs: int = 3,
                min_effect: float = 1e-3) -> Claim:
    """Higher Kurt ↔ larger W8A8 perplexity increase (SPEC §4, §5): Spearman ρ between each
    run's final mean Kurt and its relative increase quant/FP − 1 is > 0. The verdict uses the
    first W8A8 scheme (w8a8-tensor, the paper's, before w8a8-dynamic) under which some run's
    perplexity moved by at least ``min_effect`` (relative); below that there is no damage to
    rank, and the claim is not tested. Every scheme is reported."""
    statement = "Higher kurtosis goes with a larger W8A8 perplexity increase."
    schemes = sorted({s for r in runs for s in r.quant},
                     key=lambda s: (PRIMARY_SCHEMES.index(s) if s in PRIMARY_SCHEMES
                                    else len(PRIMARY_SCHEMES), s))
    details, evidence = [], []
    for s in schemes:
        pts = [r for r in runs if s in r.quant and r.finished and math.isfinite(r.final_kurt_mean)
               and math.isfinite(r.quant[s].rel_increase)]
        if len(pts) < min_runs:
            details.append(f"{s}: only {len(pts)} run(s), needs {min_runs}")
            continue
        k = [r.final_kurt_mean for r in pts]
        inc = [r.quant[s].rel_increase for r in pts]
        rho, p = spearman(k, inc), permutation_p(k, inc)
        measurable = max(abs(x) for x in inc) >= min_effect
        details.append(f"{s}: ρ(Kurt, ppl increase) = {rho:+.2f} over {len(pts)} runs "
                       f"(one-sided permutation p = {p:.3f}); increase "
                       f"{min(inc):+.2%} to {max(inc):+.2%}"
                       + ("" if measurable else
                          f" — below {min_effect:.1%} in every run: no damage to rank"))
        evidence.append({"scheme": s, "rho": rho, "p": p, "n": len(pts), "measurable": measurable,
                         "runs": [r.name for r in pts], "kurt": k, "rel_increase": inc})
    decisive = [e for e in evidence if e["measurable"] and e["scheme"].startswith("w8a8")]
    if not decisive:
        why = (f"needs {min_runs} or more finished runs with W8A8 results" if not evidence else
               f"W8A8 moved no run's perplexity by {min_effect:.1%} or more: nothing to rank")
        return Claim("kurt_vs_quant", statement, NOT_TESTED, why,
                     details + _diverged_note(runs), evidence)
    main = decisive[0]
    ok = math.isfinite(main["rho"]) and main["rho"] > 0
    summary = (f"{main['scheme']}: Spearman ρ = {main['rho']:+.2f} over {main['n']} runs "
               f"(p = {main['p']:.3f})")
    return Claim("kurt_vs_quant", statement, HELD if ok else NOT_HELD, summary,
                 details + _diverged_note(runs), evidence)


def evaluate_claims(runs: Sequence[RunRecord], loss_tol: float = 0.05) -> list[Claim]:
    """All five claims of SPEC §5, in the paper's order."""
    return [claim_op_vs_prenorm(runs, loss_tol), claim_lr(runs), claim_eps(runs),
            claim_soap(runs), claim_quant(runs)]
