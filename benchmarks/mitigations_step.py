"""Extra compute per training step of each published mitigation (issue 25, docs/mitigations.md).

The configurations of the ``mitigations`` sweep preset (seed 0 of each), each a real training
loop (``outlierlab.train.Trainer``, what ``outlierlab train`` runs) in this process, one thread,
with the monitor and evaluation off so only the method's own work is timed. The loops take turns,
``--steps`` steps each, in an order that flips every round (``_common``). A step is timed in CPU
seconds of this process (``time.process_time``: waiting for a core on a shared machine does not
count) and in wall seconds. Headline per method: the median over rounds of its per-round CPU
time / the Pre-LN + AdamW baseline's; the baseline's second copy is the A/A control (noise floor).

    python benchmarks/mitigations_step.py [--quick] [--rounds N] [--steps K] [--json OUT]
"""

from __future__ import annotations

import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import _common


def configs(out: Path) -> dict[str, object]:
    """``{method label: TrainConfig}`` for seed 0 of every point of the mitigations preset, plus
    the baseline's A/A copy."""
    from outlierlab import config
    from outlierlab.experiments.grid import load_grid

    grid = load_grid("mitigations")
    off = ["train.eval_every=0", "train.ckpt_every=0", "log.kurtosis_every=0", "train.device=cpu",
           "train.log_every=1000"]
    cfgs: dict[str, object] = {}
    args: dict[str, list[str]] = {}
    for i, p in enumerate(x for x in grid.points if x.overrides.get("train.seed") == 0):
        a = [*p.args(), *off]  # a point's overrides include the grid's [base]
        cfg = config.load(grid.preset or "default", overrides=[*a, f"out={out / str(i)}"])
        cfgs[_label(cfg)], args[_label(cfg)] = cfg, a
    cfgs["pre-ln adamw (A/A control)"] = config.load(
        grid.preset or "default", overrides=[*args["pre-ln adamw"], f"out={out / 'aa'}"])
    return cfgs


def _label(cfg) -> str:
    from outlierlab.experiments.results import arch_label

    tweo = "+tweo" if cfg.train.tweo_weight else ""
    return f"{arch_label(cfg.model.to_dict())}{tweo} {cfg.optim.name}"


def main(argv=None) -> int:
    args = _common.parse_args(__doc__.splitlines()[0], argv, add=lambda p: (
        p.add_argument("--steps", type=int, default=2, help="steps per turn (default 2)"),
        p.add_argument("--json", type=Path, help="also write the figures here")),
        rounds=5, quick_rounds=2)  # fmt: skip
    _common.set_threads(1)
    _common.print_machine()
    with tempfile.TemporaryDirectory() as tmp:
        cfgs = configs(Path(tmp))
        names = list(cfgs)
        cpu = {n: [] for n in names}
        wall = {n: [] for n in names}
        steps = (1 + args.rounds) * args.steps + 1
        with _common.trainers(cfgs, steps) as loops:
            for n in names:  # warm-up turn, untimed (optimiser state, first allocations)
                for _ in range(args.steps):
                    loops[n].run_step()
            for r in range(args.rounds):
                for n in names if r % 2 == 0 else names[::-1]:
                    gc.collect()
                    c0, w0 = time.process_time(), time.perf_counter()
                    for _ in range(args.steps):
                        loops[n].run_step()
                    cpu[n].append((time.process_time() - c0) / args.steps)
                    wall[n].append((time.perf_counter() - w0) / args.steps)
    base = "pre-ln adamw"
    rows, out = [], {}
    for n in names:
        ratio = statistics.median(a / b for a, b in zip(cpu[n], cpu[base]))
        wratio = statistics.median(a / b for a, b in zip(wall[n], wall[base]))
        out[n] = {"cpu_s_per_step": statistics.median(cpu[n]), "cpu_ratio": ratio,
                  "wall_ratio": wratio, "cpu_ratio_rounds": [a / b for a, b in
                                                             zip(cpu[n], cpu[base])]}
        rows.append([n, f"{statistics.median(cpu[n]):.3f}", f"×{ratio:.2f}",
                     _common.spread([a / b for a, b in zip(cpu[n], cpu[base])]), f"×{wratio:.2f}"])
    _common.print_table(["method", "CPU s/step", "CPU vs baseline", "rounds", "wall vs baseline"],
                        rows)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    aa = out["pre-ln adamw (A/A control)"]["cpu_ratio"]
    _common.print_headline(max(v["cpu_ratio"] for k, v in out.items() if "A/A" not in k),
                           f"largest CPU time per step vs the baseline (A/A control ×{aa:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
