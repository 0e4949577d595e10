"""``outlierlab reproduce --preset quick [--out DIR] [--workers N]``: the paper's comparison
end to end — sweep (train + quantise) then report; prints where the report is. A grid made of
parts runs them one after the other into one folder and reports once; a part runs into its
whole's folder and reports every run there (:mod:`outlierlab.experiments.grid`, "Parts")."""

from __future__ import annotations

import argparse
from pathlib import Path

from outlierlab.commands.sweep import add_sweep_args


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "reproduce", help="train, quantise and report a preset grid (the README's main job)",
        description="The paper's comparison end to end: sweep a preset grid (train and quantise), "
        "then write the report and print where it is.")
    p.add_argument("--preset", default="quick", metavar="NAME",
                   help="sweep preset or grid .toml: quick (≤ 6 min on 2 idle cores), cpu, "
                   "gpu-130m, mitigations (or one of its parts: mitigations-attn, "
                   "mitigations-optim), the tuning sweeps quick-tuning and healthy-lr")
    add_sweep_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from outlierlab.commands.report import print_claims, readable_runs
    from outlierlab.commands.sweep import launcher_kwargs, report_summary
    from outlierlab.experiments.grid import load_grid
    from outlierlab.experiments.report import write_report
    from outlierlab.experiments.sweep import run_sweep
    from outlierlab.experiments.tuning import Tuning
    from outlierlab.run_folder import RunFolder

    grid = load_grid(args.preset)
    out = Path(args.out or Path("runs") / grid.folder)
    workers = args.workers or grid.workers or 1
    threads = args.threads or grid.threads
    parts = f" (parts {', '.join(grid.parts)}, one after the other)" if grid.parts else ""
    print(f"reproduce {grid.name}: {len(grid.points)} runs{parts} into {out}, "
          f"{workers} worker(s)")
    summary = run_sweep(grid, out, workers=workers, threads=threads,
                        quantize=not args.no_quantize, **launcher_kwargs(args))
    rc = report_summary(summary)
    done = [out / p.name for p in grid.points if RunFolder(out / p.name).is_run]
    if grid.part_of and done:
        # a part shares its whole's folder: the report covers the other parts' runs there too
        done = [out]
        print(f"{grid.name} is a part of {grid.part_of}: the report covers every run in {out}")
    runs = readable_runs(done, "reproduce") if done else []
    if not runs:
        print("no run produced results; nothing to report")
        return 1
    cmd = f"outlierlab reproduce --preset {args.preset} --out {out}"
    tuning = Tuning.load(grid.tuning) if grid.tuning else None  # a shipped lr choice
    rep = write_report(runs, out / "report", title=f"outlierlab reproduce: {grid.name}",
                       command=cmd, own_lr_from=grid.own_lr_from, tuning=tuning)
    print_claims(rep)
    return rc
