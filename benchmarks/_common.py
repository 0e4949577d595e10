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
import threading
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
    "L": (6, 192, 6, 128, 16),  # the default preset (SPEC §6)
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
def step_hooks():
    """Patch ``outlierlab.data.BatchSampler`` so that each ``next()`` (the start of each step of
    ``outlierlab.train.train``) first calls the hook registered for the calling thread in the
    yielded dict ``{thread id: hook}``. The loop itself runs unchanged; restored on exit."""
    import outlierlab.data as od

    hooks: dict[int, Callable[[], None]] = {}
    base = od.BatchSampler

    class HookedSampler(base):  # type: ignore[misc, valid-type]
        def next(self):
            hook = hooks.get(threading.get_ident())
            if hook is not None:
                hook()
            return super().next()

    od.BatchSampler = HookedSampler
    try:
        yield hooks
    finally:
        od.BatchSampler = base


class LoopInterleaver:
    """Run several ``outlierlab.train.train(cfg)`` loops in threads, *one at a time*, handing
    over every ``block`` steps, in rounds whose order flips each round (ABC, CBA, ...).

    Each loop's steps are timed from one ``sampler.next()`` to the next (the whole step body:
    forward, backward, clipping, optimiser, logging, monitor). ``warmup_blocks`` blocks per
    loop come first, untimed (compilation, optimiser state). Set-up before the first step and
    the final step (final eval, checkpoint, save) are outside the timed region and run while no
    timed block runs. ``cfgs[name].train.steps`` is set here.
    """

    def __init__(self, cfgs: dict, block: int, rounds: int, warmup_blocks: int = 1):
        self.cfgs, self.block, self.rounds, self.warmup = cfgs, block, rounds, warmup_blocks
        names = list(cfgs)
        self.schedule = list(names) * warmup_blocks
        for r in range(rounds):
            self.schedule += names if r % 2 == 0 else names[::-1]
        self.pos = 0
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.timings = Timings(names, {n: [] for n in names})
        self.results: dict[str, object] = {}
        self.warmup_seconds: dict[str, list[float]] = {n: [] for n in names}

    def _wait(self, pred: Callable[[], bool]) -> None:
        with self.cond:
            while not (pred() or self.error):
                self.cond.wait(0.5)
            if self.error:
                raise RuntimeError("another loop failed") from self.error

    def _advance(self) -> None:
        with self.cond:
            self.pos += 1
            self.cond.notify_all()

    def _hook(self, name: str) -> Callable[[], None]:
        st = {"calls": 0, "blocks": 0, "t0": 0.0}
        total = self.warmup + self.rounds

        def hook() -> None:
            now = time.perf_counter()
            st["calls"] += 1
            if st["calls"] == 1:
                self._wait(lambda: self.schedule[self.pos] == name)
            elif (st["calls"] - 1) % self.block == 0:
                st["blocks"] += 1
                if st["blocks"] > self.warmup:
                    self.timings.seconds[name].append(now - st["t0"])
                else:
                    self.warmup_seconds[name].append(now - st["t0"])
                self._advance()
                if st["blocks"] == total:  # done: wait for everyone, then finish untimed
                    self._wait(lambda: self.pos == len(self.schedule))
                    return
                self._wait(lambda: self.schedule[self.pos] == name)
            else:
                return
            gc.collect()
            st["t0"] = time.perf_counter()

        return hook

    def run(self) -> Timings:
        from outlierlab.data import prepare
        from outlierlab.train import train

        steps = (self.warmup + self.rounds) * self.block + 1
        for cfg in self.cfgs.values():  # build the token cache once, before the threads
            prepare(cfg.data, progress=False)

        def target(name: str, hooks: dict) -> None:
            hooks[threading.get_ident()] = self._hook(name)
            cfg = self.cfgs[name]
            cfg.train.steps = steps
            try:
                self.results[name] = train(cfg, progress=False)
            except BaseException as exc:
                with self.cond:
                    self.error = self.error or exc
                    self.cond.notify_all()

        with step_hooks() as hooks:
            threads = [threading.Thread(target=target, args=(n, hooks), name=f"loop-{n}")
                       for n in self.cfgs]  # fmt: skip
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if self.error is not None:
            raise self.error
        for n, r in self.results.items():
            if getattr(r, "status", None) != "finished":
                raise RuntimeError(f"loop {n} ended {r}")
        return self.timings
