"""Step time of SOAP, AdaFactor, Shampoo and Muon relative to AdamW (issue 14's targets).

Two measurements, each optimiser with its registry defaults (``outlierlab.optim``, science §3;
SOAP and Shampoo, i.e. rotated AdaFactor, recompute their eigenbases every 10 steps):

1. whole training step: one ``outlierlab.train.train(cfg)`` loop per optimiser in this process,
   identical but for ``optim.name``, alternating blocks of steps (``_common.LoopInterleaver``);
   a block is a multiple of the preconditioning period, so its cost is included at its real rate;
2. ``optimizer.step()`` alone on the same model with fixed random gradients, ``block`` steps
   per timing, interleaved (``_common.interleave``).

Targets (whole step at 6 × 192, size L): Muon ≤ 1.5× and Shampoo ≤ 1.7× AdamW; each is printed
as met or not. Headline: whole-step time of SOAP / AdamW at the last size with loops.

    python benchmarks/optim.py [--quick] [--sizes M,L] [--skip-loop]
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import _common

OPTIMS = ("adamw", "soap", "adafactor", "shampoo", "muon")  # each at its registry defaults
TARGETS = {"muon": 1.5, "shampoo": 1.7}  # whole step / AdamW at size L (issue 14)
SIZES = _common.SIZES


def run_config(size: str, optim: str, out: Path | str = ""):
    return _common.bench_config(size, out, f"optim.name={optim}", "log.kurtosis_every=0")


def loop_times(size: str, rounds: int, block: int, tmp: Path) -> _common.Timings:
    cfgs = {o: run_config(size, o, tmp / f"{size}-{o}") for o in OPTIMS}
    return _common.LoopInterleaver(cfgs, block=block, rounds=rounds).run()


def step_times(size: str, rounds: int, block: int) -> _common.Timings:
    """``optimizer.step()`` alone, ``block`` calls per timing, fixed random gradients."""
    import torch

    from outlierlab.data import DataConfig, prepare
    from outlierlab.model import GPT
    from outlierlab.optim import build_optimizer

    vocab = prepare(DataConfig(), progress=False).tokenizer.vocab_size
    variants = {}
    for o in OPTIMS:
        cfg = run_config(size, o)
        cfg.model.vocab_size = vocab
        torch.manual_seed(0)
        model = GPT(cfg.model)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt = build_optimizer(model, cfg.optim)

        def run(opt=opt):
            for _ in range(block):
                opt.step()

        variants[o] = run
    return _common.interleave(variants, rounds, warmup=1)


def main(argv=None) -> float:
    def add(p):
        p.add_argument("--sizes", default=None, help="two of S,M,L (default M,L; --quick S,M "
                       "with the whole-step loops at S only)")
        p.add_argument("--block", type=int, default=None,
                       help="steps per timing (default 10; --quick 10 for the loop)")
        p.add_argument("--skip-loop", action="store_true", help="only optimizer.step() alone")

    args = _common.parse_args(__doc__.splitlines()[0], argv, add, rounds=5, quick_rounds=1)
    sizes = (args.sizes or ("S,M" if args.quick else "M,L")).split(",")
    block = args.block or 10
    _common.print_machine()
    rows, head, head_what, targets = [], float("nan"), "", []
    for size in sizes:
        L, d, _, T, B = SIZES[size]
        shape = f"{L}×{d}, T={T}, B={B}"
        st = step_times(size, args.rounds, block)
        lt = None
        if not args.skip_loop and not (args.quick and size != sizes[0]):
            with tempfile.TemporaryDirectory(prefix="bench-optim-") as tmp:
                lt = loop_times(size, args.rounds, block, Path(tmp))
        for o in OPTIMS:
            row = [size, shape, o, 1e3 * st.median(o) / block,
                   _common.spread(st.ratios(o, "adamw"))]  # fmt: skip
            if lt is not None:
                row += [1e3 * lt.median(o) / block, _common.spread(lt.ratios(o, "adamw"))]
            elif not args.skip_loop:
                row += ["-", "-"]
            rows.append(row)
        print(f"size {size} done", flush=True)
        if lt is not None or args.skip_loop:
            t, what = (lt, "whole training step") if lt is not None else (st, "optimizer.step()")
            head = statistics.median(t.ratios("soap", "adamw"))
            head_what = f"{what} time SOAP / AdamW at size {size}"
        if size == "L" and lt is not None:
            targets = [(o, statistics.median(lt.ratios(o, "adamw")), x) for o, x in TARGETS.items()]
    header = ["size", "shape", "optimiser", "opt.step ms", "opt.step / AdamW"]
    if not args.skip_loop:
        header += ["train step ms", "train step / AdamW"]
    _common.print_table(header, rows)
    for o, ratio, limit in targets:
        verdict = "met" if ratio <= limit else "NOT met"
        print(f"target: {o} / adamw whole step at L = {ratio:.3f} (≤ {limit}: {verdict})")
    _common.print_headline(head, f"headline: {head_what}")
    return head


if __name__ == "__main__":
    main()
