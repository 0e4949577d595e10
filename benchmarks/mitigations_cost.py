"""What one run of the ``mitigations`` sweep costs, stage by stage (issue 25, docs/mitigations.md
"How long it takes").

For the chosen points of a sweep preset (default: seed 0 of the Pre-LN + AdamW baseline), runs
the sweep's exact commands (:mod:`outlierlab.experiments.sweep`: ``train``, ``quantize`` for each
of the preset's schemes, ``measure --save``) one after the other, one thread, into a scratch
folder, and times each in CPU seconds of the child process (``getrusage(RUSAGE_CHILDREN)``:
waiting for a core on a shared machine does not count, so on 2 idle cores with one thread per
worker this is close to its wall time) and in wall seconds. ``--from SWEEP`` copies a finished
run from SWEEP instead of training it (quantise and measure only; SWEEP is only read).

    python benchmarks/mitigations_cost.py [--preset mitigations] [--points NAME ...]
        [--from SWEEP] [--json OUT]

``--estimate MEASURED.json`` runs nothing: it prices every part of the preset on 2 idle cores
from the figures measured, as each run's train time T0 × its method's CPU time per step relative
to the baseline (:data:`STEP_RATIO`, benchmarks/RESULTS.md "mitigations_step") plus its
quantise + measure CPU time (MEASURED.json's, for the measured point with the same attention
kind: fused SDPA, eager weights, or the OP block), summed over the part's runs / 2 workers,
plus half the longest run (the last one may run alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common


def timed(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(CPU s, wall s, exit code) of ``cmd`` as one child process, one thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    w0 = time.perf_counter()
    with log.open("a") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env,
                            stdin=subprocess.DEVNULL).returncode
    w = time.perf_counter() - w0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime, w, rc


STEP_RATIO = {
    "pre-ln adamw": 1.00, "pre-ln+embproj adamw": 1.01, "pre-ln+gate-head adamw": 1.06,
    "pre-ln+gate-elem adamw": 1.08, "pre-ln+tweo adamw": 1.08, "pre-ln muon": 1.12,
    "pre-ln orthoadam": 1.17, "op adamw": 1.20, "pre-ssnorm adamw": 1.21,
    "op+gate-elem adamw": 1.30, "pre-ssnorm+embproj muon": 1.32, "op soap": 1.46,
    "pre-ln+clipped adamw": 1.61, "pre-ln+kv-bias adamw": 1.75,
    "pre-ln+softmax1 orthoadam": 1.91, "pre-ln+softpick adamw": 1.99,
    "pre-ln+softmax1 adamw": 2.49,
}
"""CPU time per training step relative to Pre-LN + AdamW, by method (benchmarks/RESULTS.md,
mitigations_step, 2026-12-03: median over 5 interleaved rounds)."""
EAGER = ("softmax1", "softpick", "clipped", "kv-bias")
"""Methods whose attention weights are written out (no fused SDPA): their evaluation costs more."""


def _kind(label: str) -> str:
    return ("op" if label.startswith("op") else
            "eager" if any(k in label for k in EAGER) else "sdpa")


def estimate(preset: str, measured: dict[str, dict[str, float]], t0: float,
             workers: int = 2) -> list[tuple[str, int, float, float, float]]:
    """(grid, runs, train s, quantise + measure s, wall s on ``workers`` idle cores) for the
    preset and each of its parts."""
    from outlierlab.config import load
    from outlierlab.experiments.grid import load_grid
    from outlierlab.experiments.results import arch_label

    def label(grid, point) -> str:
        cfg = load(grid.preset, None, point.args())
        tweo = "+tweo" if cfg.train.tweo_weight else ""
        return f"{arch_label(cfg.model.to_dict())}{tweo} {cfg.optim.name}"

    q_by_kind: dict[str, float] = {}
    whole = load_grid(preset)
    for name, stages in measured.items():
        pt = next(p for p in whole.points if p.name == name)
        q_by_kind[_kind(label(whole, pt))] = sum(v for k, v in stages.items() if k != "train")
    out = []
    for g in [load_grid(p) for p in whole.parts] + [whole]:
        train = qm = longest = 0.0
        for pt in g.points:
            lab = label(g, pt)
            q = q_by_kind.get(_kind(lab), max(q_by_kind.values()))
            train += t0 * STEP_RATIO[lab]
            qm += q
            longest = max(longest, t0 * STEP_RATIO[lab] + q)
        out.append((g.name, len(g.points), train, qm, (train + qm) / workers + longest / 2))
    return out


def main(argv=None) -> int:
    from outlierlab.experiments.grid import load_grid
    from outlierlab.experiments.sweep import measure_command, quant_command, train_command

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mitigations")
    p.add_argument("--points", nargs="*", help="point names (default: the baseline, seed 0)")
    p.add_argument("--from", dest="src", type=Path, help="a finished sweep to copy runs from "
                   "(then no training)")
    p.add_argument("--json", type=Path, help="also write the figures here")
    p.add_argument("--estimate", type=Path, metavar="MEASURED.json",
                   help="price the preset and its parts from this run's --json (runs nothing)")
    p.add_argument("--t0", type=float, default=87.0, help="--estimate: the baseline's train "
                   "time on an idle core, s (default 87: the mitigations sweep's first runs)")
    args = p.parse_args(argv)
    if args.estimate:
        measured = json.loads(args.estimate.read_text())["cpu_s"]
        print(f"T0 = {args.t0:.0f} s; quantise + measure CPU s measured: " + ", ".join(
            f"{n} {sum(v for k, v in st.items() if k != 'train'):.1f}"
            for n, st in measured.items()))
        print("| grid | runs | train (s) | quantise + measure (s) | on 2 idle cores (min) |")
        print("|---|---|---|---|---|")
        for name, n, train, qm, wall in estimate(args.preset, measured, args.t0):
            print(f"| {name} | {n} | {train:.0f} | {qm:.0f} | {wall / 60:.0f} |")
        return 0
    _common.print_machine()
    grid = load_grid(args.preset)
    names = args.points or [grid.points[0].name]
    by_name = {pt.name: pt for pt in grid.points}
    py = sys.executable
    rows: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            d = Path(tmp) / name
            log = Path(tmp) / f"{name}.log"
            stages: list[tuple[str, list[str]]] = []
            if args.src is not None:
                shutil.copytree(args.src / name, d, ignore=shutil.ignore_patterns(
                    "quant", "measure.json", "checkpoints", "sweep.log"))
            else:
                stages.append(("train", train_command(grid, by_name[name], d, py)))
            stages += [(f"quantize {s}", quant_command(d, s, py, grid.quant_args))
                       for s in grid.schemes]
            if grid.measure_args is not None:
                stages.append(("measure", measure_command(d, py, grid.measure_args)))
            rows[name] = {}
            for stage, cmd in stages:
                cpu, wall, rc = timed(cmd, log)
                if rc != 0:
                    print(log.read_text()[-2000:])
                    raise SystemExit(f"{name}: {stage} exited {rc}")
                rows[name][stage] = cpu
                print(f"{name:55s} {stage:24s} CPU {cpu:7.1f} s  wall {wall:7.1f} s", flush=True)
            q = sum(v for k, v in rows[name].items() if k != "train")
            print(f"{name:55s} {'quantize + measure':24s} CPU {q:7.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"preset": args.preset, "cpu_s": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
