"""``outlierlab report RUN_DIRS... --out DIR``: figures, the results table and the paper's
claims (science §5) as one self-contained HTML page and Markdown."""

from __future__ import annotations

import argparse

from outlierlab.cli import output_dir
from outlierlab.fields import arg_type


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report", help="HTML + Markdown report (figures, table, claims) of run folders",
        description="Figures, the results table and the paper's claims (science §5) of runs, "
        "as one self-contained HTML page and Markdown.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run folders, or a sweep folder holding them")
    p.add_argument("--out", required=True, metavar="DIR", type=output_dir,
                   help="where the report goes")
    p.add_argument("--title", default="", help="page title")
    p.add_argument("--loss-tol", type=arg_type(lo=0), default=0.05,
                   help="for runs without a held-out Kurt trajectory: relative val-loss gap "
                   "still counted as 'matched loss' (default 0.05)")
    p.add_argument("--tuning", metavar="TUNING_JSON", default=None,
                   help="a tuning sweep's REPORT/tuning.json, or a shipped lr choice "
                   "(healthy-lr): also test the claims at its shared lr and at each "
                   "configuration's own lr")
    p.add_argument("--own-lr-from", metavar="TUNING_SWEEP", default=None,
                   help="the runs are at the lrs this tuning sweep chose, one per "
                   "configuration (a grid's own_lr_from, e.g. quick-tuning): pair "
                   "configurations across lrs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from outlierlab.errors import DataError
    from outlierlab.experiments.report import write_report
    from outlierlab.experiments.tuning import Tuning

    tuning = Tuning.load(args.tuning) if args.tuning else None
    runs = readable_runs(args.runs, "report")
    if not runs:
        raise DataError("no readable run folders among " + ", ".join(args.runs))
    rep = write_report(runs, args.out, title=args.title, loss_tol=args.loss_tol,
                       command="outlierlab report " + " ".join(args.runs)
                       + (f" --tuning {args.tuning}" if args.tuning else "")
                       + (f" --own-lr-from {args.own_lr_from}" if args.own_lr_from else ""),
                       tuning=tuning, own_lr_from=args.own_lr_from)
    print_claims(rep)
    return 0


def print_claims(rep) -> None:
    if rep.seeds_note:
        print(rep.seeds_note)
    for c in rep.claims:
        print(f"{c.verdict:>12}  {c.statement}  {c.summary}")
    for heading, claims in (rep.claim_sets or {}).items():
        print(heading)
        for c in claims:
            print(f"{c.verdict:>12}  {c.statement}  {c.summary}")
    if rep.tuning is not None:
        t = rep.tuning
        print("lr tuning: shared lr " + ("none" if t.shared_lr is None else f"{t.shared_lr:g}")
              + "; own lr: " + "; ".join(f"{c.label} {c.own_lr:g}" for c in t.configurations
                                          if c.own_lr is not None)
              + f" ({rep.html.parent / 'tuning.md'})")
    print(f"report: {rep.html}\n        {rep.markdown}")


def readable_runs(paths: list, command: str) -> list:
    """The :class:`~outlierlab.experiments.results.RunRecord` of each run among ``paths``; a run
    whose files cannot be read is named on stderr with the reason and left out."""
    import sys

    from outlierlab.experiments.results import load_runs

    records, unreadable = load_runs(paths)
    for path, why in unreadable:
        print(f"outlierlab {command}: skipped unreadable run {path}: {why}", file=sys.stderr)
    return records
