"""``outlierlab runs [DIR]``: a table of the runs under DIR."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "runs",
        help="list runs: status, steps, final val loss, final mean/max kurtosis",
        description="List the run folders under DIR (searched up to 3 levels deep).",
    )
    p.add_argument("dir", nargs="?", default="runs", help="folder holding run folders")
    p.add_argument("--json", action="store_true", help="one JSON object per run instead")
    p.set_defaults(func=run)


def summarize(run: Path) -> dict:
    """Status and the final logged values of one run folder."""
    from outlierlab.train.run_dir import read_metrics

    def load(name: str) -> dict:
        try:
            return json.loads((run / name).read_text())
        except (OSError, ValueError):
            return {}

    status, cfg = load("status.json"), load("config.json")
    rows = read_metrics(run / "metrics.jsonl")
    val = [r for r in rows if "val_loss" in r]
    kurt = [r for r in rows if "kurtosis_mean" in r]
    return {
        "run": str(run),
        "status": status.get("status", "?"),
        "step": status.get("step", 0),
        "steps": cfg.get("train", {}).get("steps"),
        "val_loss": val[-1]["val_loss"] if val else None,
        "kurtosis_mean": kurt[-1]["kurtosis_mean"] if kurt else None,
        "kurtosis_max": kurt[-1]["kurtosis_max"] if kurt else None,
        "updated": status.get("updated"),
    }


def find_runs(root: Path, depth: int = 3) -> list[Path]:
    if (root / "status.json").is_file():
        return [root]
    found = []
    for pattern in ("*/status.json", "*/*/status.json", "*/*/*/status.json")[:depth]:
        found += [p.parent for p in root.glob(pattern)]
    return sorted(set(found))


def run(args: argparse.Namespace) -> int:
    from outlierlab.errors import ConfigError

    root = Path(args.dir)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    runs = [summarize(r) for r in find_runs(root)]
    if args.json:
        for r in runs:
            print(json.dumps(r))
        return 0
    from rich.console import Console
    from rich.table import Table

    def num(v, fmt):
        return "-" if v is None else format(v, fmt)

    table = Table(title=f"runs under {root}" if runs else f"no runs under {root}")
    for col in ("run", "status", "steps", "val loss", "Kurt mean", "Kurt max", "updated"):
        table.add_column(col, justify="left" if col in ("run", "status", "updated") else "right")
    for r in runs:
        name = str(Path(r["run"]).relative_to(root)) if r["run"] != str(root) else root.name
        table.add_row(
            name, r["status"], f"{r['step']}/{r['steps'] or '?'}", num(r["val_loss"], ".4f"),
            num(r["kurtosis_mean"], ".2f"), num(r["kurtosis_max"], ".2f"), r["updated"] or "-",
        )  # fmt: skip
    Console(width=max(100, Console().width)).print(table)
    return 0
