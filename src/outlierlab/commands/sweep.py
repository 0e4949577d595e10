"""``outlierlab sweep GRID.toml|PRESET [--workers N] [--dry-run] [--out DIR]
[--launcher local|submitit [--launcher-param KEY=VALUE ...]]``: train every
point of a grid (each an ordinary ``outlierlab train`` run), then quantise the finished ones."""

from __future__ import annotations

import argparse
from pathlib import Path

from outlierlab.cli import output_dir
from outlierlab.fields import arg_type


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sweep", help="train and quantise every point of a grid (a .toml file or a preset)",
        description="Train every point of a grid (each an ordinary outlierlab train run), then "
        "quantise the finished ones.")
    add_sweep_args(p)
    p.add_argument("grid", metavar="GRID", help="a grid .toml file, or a preset: quick, cpu, "
                   "gpu-130m, mitigations (or its parts mitigations-attn, mitigations-optim) "
                   "(outlierlab/presets/sweeps)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the exact commands (one line per run) and run nothing")
    p.set_defaults(func=run)


def add_sweep_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", metavar="DIR", type=output_dir,
                   help="sweep folder (default: runs/<grid name>; a part's: its whole's)")
    p.add_argument("--workers", type=arg_type(lo=1, integer=True), metavar="N",
                   help="runs at once on this machine, ≥ 1 (default: the grid's, else 1)")
    p.add_argument("--threads", type=arg_type(lo=1, integer=True), metavar="T",
                   help="torch threads per run, ≥ 1 (default: the grid's, else cores / workers)")
    p.add_argument("--no-quantize", action="store_true", help="train only")
    p.add_argument("--launcher", choices=("local", "submitit"), default="local",
                   help="where points run: local (worker processes here, the default) or "
                   "submitit (one cluster job per pending point: SLURM, or cluster=local)")
    p.add_argument("--launcher-param", action="append", default=[], metavar="KEY=VALUE",
                   help="a submitit executor parameter, repeatable: e.g. slurm_partition=gpu, "
                   "timeout_min=240, gpus_per_node=1, cpus_per_task=8, cluster=local")


def launcher_kwargs(args: argparse.Namespace) -> dict:
    """``run_sweep``'s launcher arguments from ``--launcher``/``--launcher-param``."""
    from outlierlab.experiments.launch import parse_params

    return {"launcher": args.launcher, "launcher_params": parse_params(args.launcher_param)}


def run(args: argparse.Namespace) -> int:
    from outlierlab.experiments.grid import load_grid
    from outlierlab.experiments.sweep import dry_run_lines, run_sweep

    grid = load_grid(args.grid)
    out = Path(args.out or Path("runs") / grid.folder)
    workers = args.workers or grid.workers or 1
    threads = args.threads or grid.threads
    if args.dry_run:
        for line in dry_run_lines(grid, out, "python", quantize=not args.no_quantize):
            print(line)
        return 0
    where = (f"{workers} worker(s)" if args.launcher == "local"
             else f"launcher {args.launcher}")
    print(f"sweep {grid.name}: {len(grid.points)} runs into {out}, {where}")
    summary = run_sweep(grid, out, workers=workers, threads=threads,
                        quantize=not args.no_quantize, **launcher_kwargs(args))
    return report_summary(summary)


def report_summary(summary) -> int:
    """Print the sweep's outcome; exit 1 if a run crashed or a quantisation failed."""
    print(f"sweep done in {summary.wall_s:.0f} s: {len(summary.trained)} trained, "
          f"{len(summary.outcomes) - len(summary.trained)} already there; "
          f"manifest {summary.out / summary.manifest}")
    for o in summary.failed:
        what = o.message or f"quantize failed: {', '.join(o.quant_failed)}"
        print(f"  {o.name}: {o.status}: {what}")
    return 0 if summary.ok else 1
