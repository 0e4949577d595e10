"""Timing helpers shared by the benchmarks: interleaved A/B rounds, medians, ratios, machine info.

Every benchmark compares variants measured *in the same process, in alternating order*, so that
drift (other jobs on a shared machine, CPU frequency, allocator warm-up) hits both sides alike.
A round times each variant once, in an order that flips every round (ABBA...); the headline is the
median over rounds of the per-round ratio, never an absolute time.

Each benchmark calls :func:`parse_args` (adds ``--quick``, ``--rounds``, ``--threads``), then
:func:`interleave`, then prints a table with :func:`print_table` and its headline with
:func:`print_headline`, whose output is the last line: ``ratio=X``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # run from a checkout without an install
    sys.path.insert(0, str(ROOT / "src"))


#: Benchmark model sizes: name -> (n_layer, d_model, n_head, seq_len, batch_size).
SIZES: dict[str, tuple[int, int, int, int, int]] = {
    "S": (2, 64, 2, 64, 8),
    "M": (4, 128, 4, 128, 16),
    "L": (6, 192, 6, 128, 16),  # the default preset (science §6)
}


def bench_config(size: str, out: Path | str, *overrides: str):
    """The `default` training preset at ``size`` on the CPU, with no evaluation or checkpoint
    inside the run, then ``overrides`` (dotted, as on the command line)."""
    from outlierlab import config

    L, d, h, T, B = SIZES[size]
    return config.load("default", overrides=[
        f"model.n_layer={L}", f"model.d_model={d}", f"model.n_head={h}", f"model.seq_len={T}",
        f"train.batch_size={B}", "train.eval_every=0", "train.ckpt_every=0",
        "train.eval_windows=4", "train.log_every=10", "train.device=cpu", f"out={out}",
        *overrides,
    ])  # fmt: skip


def parse_args(
    description: str,
    argv: Sequence[str] | None = None,
    add: Callable[[argparse.ArgumentParser], None] | None = None,
    rounds: int = 7,
    quick_rounds: int = 3,
) -> argparse.Namespace:
    """Common flags; ``args.rounds`` is resolved from ``--quick`` unless given explicitly."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="fewer rounds and sizes (≤ 60 s)")
    p.add_argument("--rounds", type=int, default=None, help=f"A/B rounds (default {rounds}, "
                   f"{quick_rounds} with --quick)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: all cores, max 2 on this machine)")
    p.add_argument("--seed", type=int, default=0)
    if add is not None:
        add(p)
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = quick_rounds if args.quick else rounds
    if args.rounds < 1:
        p.error("--rounds must be ≥ 1")
    set_threads(args.threads)
    return args


def set_threads(n: int | None) -> int:
    """Set torch's intra-op thread count (default: every core this process may use)."""
    import torch

    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, int(n or 1)))
    return torch.get_num_threads()


@dataclass
class Timings:
    """Seconds per call of each variant, one entry per round, in the variants' order."""

    names: list[str]
    seconds: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def ratios(self, num: str, den: str) -> list[float]:
        """Per-round time ratio num/den (>1: ``num`` is slower)."""
        return [a / b for a, b in zip(self.seconds[num], self.seconds[den])]

    def ratio(self, num: str, den: str) -> float:
        """Median over rounds of the per-round time ratio num/den."""
        return statistics.median(self.ratios(num, den))

    def windowed(self, k: int) -> Timings:
        """Sums over consecutive windows of ``k`` entries (e.g. per-step times → 10-step
        windows); a last, shorter window is dropped."""
        return Timings(self.names, {n: [sum(s[i : i + k]) for i in range(0, len(s) - k + 1, k)]
                                    for n, s in self.seconds.items()})  # fmt: skip

    def speed_ratio(self, name: str, baseline: str) -> float:
        """Median throughput of ``name`` relative to ``baseline`` (>1: ``name`` is faster)."""
        return statistics.median(b / a for a, b in zip(self.seconds[name], self.seconds[baseline]))


def interleave(
    variants: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    gc_collect: bool = True,
) -> Timings:
    """Time each variant once per round, alternating the order every round (ABC, CBA, ABC, ...).

    ``variants`` maps a name to a zero-argument callable doing one unit of work (e.g. k training
    steps). ``warmup`` untimed calls of each variant come first. Returns seconds per call.
    """
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    t = Timings(names, {n: [] for n in names})
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            if gc_collect:
                gc.collect()
            t0 = time.perf_counter()
            variants[n]()
            t.seconds[n].append(time.perf_counter() - t0)
    return t


def machine() -> dict[str, object]:
    """Date, CPU, cores, threads, load and library versions: the context a figure needs."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load1": round(load, 2),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def print_machine() -> None:
    m = machine()
    print(" | ".join(f"{k}={v}" for k, v in m.items()), flush=True)


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table (pasteable into RESULTS.md)."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
        return str(v)

    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(fmt(v) for v in r) + " |")
    sys.stdout.flush()


def spread(xs: Sequence[float]) -> str:
    """``median [min–max]`` of a list of ratios, for the table."""
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}–{max(xs):.3f}]"


def print_headline(ratio: float, note: str = "") -> None:
    """The last line of every benchmark: ``ratio=X`` (a note, if any, goes on the line before)."""
    if note:
        print(note)
    print(f"ratio={ratio:.3f}", flush=True)


# ---------------------------------------------------------------- timing the real training loop
@contextlib.contextmanager
def trainers(cfgs: dict, steps: int):
    """``{name: outlierlab.train.Trainer}`` for each config (``train.steps`` set to ``steps``,
    no console output, ``begin()`` called); closed (newest first) on exit."""
    from outlierlab.data import prepare
    from outlierlab.train import Trainer

    with contextlib.ExitStack() as stack:
        loops = {}
        for name, cfg in cfgs.items():
            prepare(cfg.data, progress=False)  # the token cache, outside any timing
            cfg.train.steps = steps
            loops[name] = stack.enter_context(Trainer(cfg, progress=False))
            loops[name].begin()
        yield loops


class LoopInterleaver:
    """Run several real training loops (``outlierlab.train.Trainer``, exactly what
    ``outlierlab train`` runs) in this thread, *one at a time*, ``block`` steps each
    (``Trainer.run_step``: forward, backward, clipping, optimiser, logging, monitor), in rounds
    whose order flips each round (ABC, CBA, ...). ``warmup_blocks`` blocks per loop come first,
    untimed (compilation, optimiser state). Set-up and the final step (final eval, checkpoint,
    save) are outside the timed region. ``cfgs[name].train.steps`` is set here.
    """

    def __init__(self, cfgs: dict, block: int, rounds: int, warmup_blocks: int = 1):
        self.cfgs, self.block, self.rounds, self.warmup = cfgs, block, rounds, warmup_blocks
        names = list(cfgs)
        self.schedule = list(names) * warmup_blocks
        for r in range(rounds):
            self.schedule += names if r % 2 == 0 else names[::-1]
        self.timings = Timings(names, {n: [] for n in names})
        self.results: dict[str, object] = {}
        self.warmup_seconds: dict[str, list[float]] = {n: [] for n in names}
        self.current: str | None = None  # the loop of the timed block running now, else None

    def run(self) -> Timings:
        steps = (self.warmup + self.rounds) * self.block + 1
        with trainers(self.cfgs, steps) as loops:
            done = {n: 0 for n in loops}
            for name in self.schedule:
                gc.collect()
                timed = done[name] >= self.warmup
                self.current = name if timed else None
                t0 = time.perf_counter()
                for _ in range(self.block):
                    loops[name].run_step()
                dt = time.perf_counter() - t0
                self.current = None
                done[name] += 1
                (self.timings.seconds if timed else self.warmup_seconds)[name].append(dt)
            for name, t in loops.items():  # the last step (eval, checkpoint, save), untimed
                self.results[name] = r = t.fit()
                if r.status != "finished":
                    raise RuntimeError(f"loop {name} ended {r}")
        return self.timings
