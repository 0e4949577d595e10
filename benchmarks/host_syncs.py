"""Host-device syncs per training step of the real loop (``Trainer.run_step``), by kind of step.

A plain step (not logged, evaluated, checkpointed or measured, and not a ``train.sync_every``
step) should read nothing on the host: 0 syncs. Read steps fetch the unread steps' loss,
gradient norm and stop flag in one transfer; log steps also write a metrics row, measured steps
read the monitor's statistics. Counted with :class:`outlierlab.train.syncs.SyncCounter`
(torch's sync debug mode on CUDA; calls of the host-reading tensor methods on the CPU).

    python benchmarks/host_syncs.py [--quick] [--device cpu|cuda]

The headline ``ratio=`` is the mean number of syncs per plain step (goal: 0).
"""

from __future__ import annotations

import collections
import statistics
import sys
import tempfile
from pathlib import Path

import torch

import _common


def count_syncs(dev: str, steps: int, sync_every: int):
    """Syncs of each step of a ``steps``-step run of the S model, by kind of step."""
    from outlierlab.train.syncs import SyncCounter

    counts: dict[str, list[int]] = collections.defaultdict(list)
    where: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    with tempfile.TemporaryDirectory(prefix="host-syncs-") as tmp:
        cfg = _common.bench_config("S", Path(tmp) / "run", f"train.steps={steps}",
                                   "train.log_every=12", f"train.sync_every={sync_every}",
                                   "log.kurtosis_every=20", f"train.device={dev}")  # fmt: skip
        with _common.trainers({"run": cfg}, steps) as loops:
            t = loops["run"]
            tc, lc = t.cfg.train, t.cfg.log
            while t.step < steps:
                n = t.step + 1
                kind = ("measured" if n % lc.kurtosis_every == 0 else
                        "log" if n % tc.log_every == 0 or n == steps else
                        "sync_every" if n % tc.sync_every == 0 else "plain")  # fmt: skip
                with SyncCounter(dev) as c:
                    t.run_step()
                counts[kind].append(c.count)
                where[kind].update(c.calls)
    return counts, where


def main(argv=None) -> int:
    args = _common.parse_args(
        __doc__.splitlines()[0], argv, rounds=1, quick_rounds=1,
        add=lambda p: p.add_argument("--device", default="auto", help="auto, cpu or cuda"))
    dev = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    _common.print_machine()
    steps = 24 if args.quick else 60
    plain = float("nan")
    # the baseline, measured in the same run: sync_every=1 reads every step (the old loop)
    for sync_every in (1, 8):
        counts, where = count_syncs(dev, steps, sync_every)
        rows = [(k, len(v), statistics.mean(v), max(v), ", ".join(
            f"{w} ×{m}" for w, m in where[k].most_common(3))) for k, v in sorted(counts.items())]
        print(f"device {dev}; {steps} steps; log_every 12, sync_every {sync_every}, "
              "kurtosis_every 20")
        _common.print_table(["step kind", "steps", "syncs/step (mean)", "max", "where (top 3)"],
                            rows)  # fmt: skip
        if sync_every != 1:
            plain = statistics.mean(counts["plain"]) if counts["plain"] else float("nan")
    plain = statistics.mean(counts["plain"]) if counts["plain"] else float("nan")
    _common.print_headline(plain, "ratio = host syncs per plain step (goal 0)")
    return 0 if plain == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
