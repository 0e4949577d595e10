"""``train.compile=true`` (torch.compile, inductor) vs eager on CPU.

Two ``outlierlab.train.train(cfg)`` loops in this process, identical but for ``train.compile``,
handing over after every step (``_common.LoopInterleaver``, block = 1) and compared over
windows of ``window`` steps. The first ``warmup`` steps of each (compilation, warm-up) are
untimed; compilation time is reported from the first step. Headline: the median over windows
of tokens/s(compiled) / tokens/s(eager) at the largest size run. Goal ≥ 1.2×.

Inductor keeps compiled graphs in its on-disk cache (``/tmp/torchinductor_$USER``), so a second
run compiles in seconds; the first cold compilation on a 2-core CPU takes 20–50 s.

    python benchmarks/compile.py [--quick] [--sizes S,L]
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import _common

SIZES = _common.SIZES


def run_config(size: str, compile_: bool, out: Path):
    return _common.bench_config(
        size, out, "log.kurtosis_every=0", f"train.compile={str(compile_).lower()}"
    )


def main(argv=None) -> float:
    def add(p):
        p.add_argument("--sizes", default=None, help="comma list of S,M,L (default M,L; "
                       "--quick: S)")
        p.add_argument("--window", type=int, default=10, help="steps per timed window")
        p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")

    args = _common.parse_args(__doc__.splitlines()[0], argv, add, rounds=6, quick_rounds=3)
    sizes = (args.sizes or ("S" if args.quick else "M,L")).split(",")
    _common.print_machine()
    import torch

    rows, ratios = [], []
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="bench-compile-") as tmp:
            cfgs = {"compiled": run_config(size, True, Path(tmp) / "c"),
                    "eager": run_config(size, False, Path(tmp) / "e")}  # fmt: skip
            torch._dynamo.reset()
            t0 = time.perf_counter()
            inter = _common.LoopInterleaver(cfgs, block=1, rounds=args.window * args.rounds,
                                            warmup_blocks=args.warmup)  # fmt: skip
            t = inter.run().windowed(args.window)
            wall = time.perf_counter() - t0
        L, d, _, T, B = SIZES[size]
        tok = args.window * B * T
        speed = [e / c for c, e in zip(t.seconds["compiled"], t.seconds["eager"])]
        first = inter.warmup_seconds["compiled"][0] - inter.warmup_seconds["eager"][0]
        print(f"size {size}: per-window speed-ups " + " ".join(f"{x:.3f}" for x in speed)
              + f"; compilation ≈ {first:.0f} s (first block, compiled − eager); "
              f"benchmark wall {wall:.0f} s", flush=True)
        rows.append([size, f"{L}×{d}, T={T}, B={B}", tok / statistics.median(t.seconds["eager"]),
                     tok / statistics.median(t.seconds["compiled"]), _common.spread(speed)])
        ratios.append(statistics.median(speed))
    _common.print_table(
        ["size", "shape", "eager tok/s", "compiled tok/s", "compiled / eager, median [min–max]"],
        rows,
    )
    head = ratios[-1]
    _common.print_headline(head, f"goal ≥ 1.2× at size {sizes[-1]}: "
                           f"{'met' if head >= 1.2 else 'NOT met'}")
    return head


if __name__ == "__main__":
    main()
