"""``outlierlab runs [DIR]``: a table of the runs under DIR."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from outlierlab.errors import RunFolderError
from outlierlab.metric_rows import final_kurtosis
from outlierlab.run_folder import RunFolder, find_runs


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "runs",
        help="list runs: status, steps, final val loss, final mean/max Kurt and where measured",
        description="List the run folders under DIR (searched up to 3 levels deep).",
    )
    p.add_argument("dir", nargs="?", default="runs", help="folder holding run folders")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead")
    p.set_defaults(func=run)


def summarize(run: RunFolder) -> dict:
    """Status and the final logged values of one run folder; the final Kurt is
    :func:`~outlierlab.metric_rows.final_kurtosis` (the report's), ``kurtosis_from`` saying
    where it was measured (``held-out eval`` or ``last train batch``). A folder whose files
    cannot be read gets status ``unreadable`` and the reason in ``message``."""
    row = {"run": str(run.path), "status": "?", "step": 0, "steps": None, "val_loss": None,
           "final_kurtosis_mean": None, "final_kurtosis_max": None, "kurtosis_from": None,
           "kurtosis_step": None, "updated": None, "message": ""}
    try:
        status, train, rows = run.status, run.section("train"), run.metrics
    except RunFolderError as exc:
        return {**row, "status": "unreadable", "message": str(exc)}
    val = [r for r in rows if "val_loss" in r]
    kurt = final_kurtosis(rows)
    return {
        **row,
        "status": str(status.get("status", "?")),
        "step": status.get("step", 0),
        "steps": train.get("steps"),
        "val_loss": val[-1]["val_loss"] if val else None,
        "final_kurtosis_mean": kurt.mean if kurt.source else None,
        "final_kurtosis_max": kurt.max if kurt.source else None,
        "kurtosis_from": kurt.source or None,
        "kurtosis_step": kurt.step,
        "updated": status.get("updated"),
        "message": str(status.get("message") or ""),
    }


def run(args: argparse.Namespace) -> int:
    from outlierlab.errors import ConfigError

    root = Path(args.dir)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    runs = [summarize(r) for r in find_runs([root])]
    if args.json:
        for r in runs:
            print(json.dumps(r))
        return 0
    from rich.console import Console
    from rich.table import Table

    def num(v, fmt):
        return format(v, fmt) if isinstance(v, (int, float)) else "-"

    table = Table(title=f"runs under {root}" if runs else f"no runs under {root}")
    left = ("run", "status", "Kurt from", "updated")
    for col in ("run", "status", "steps", "val loss", "Kurt mean", "Kurt max", "Kurt from",
                "updated"):
        table.add_column(col, justify="left" if col in left else "right")
    for r in runs:
        name = str(Path(r["run"]).relative_to(root)) if r["run"] != str(root) else root.name
        table.add_row(
            name, r["status"], f"{r['step']}/{r['steps'] or '?'}", num(r["val_loss"], ".4f"),
            num(r["final_kurtosis_mean"], ".2f"), num(r["final_kurtosis_max"], ".2f"),
            r["kurtosis_from"] or "-", str(r["updated"] or "-"),
        )  # fmt: skip
    console = Console(width=max(100, Console().width))
    console.print(table)
    for r in runs:
        if r["status"] == "unreadable":
            console.print(f"unreadable: {r['message']}", markup=False, highlight=False)
    return 0
