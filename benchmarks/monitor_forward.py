"""Cost of the outlier monitor on a forward pass (no grad, eval): the worst case, since a
training step adds a backward pass (≈ 2 forwards) that the monitor does not touch.

Variants, timed in alternating order within each round (``_common.interleave``):
``plain`` (no hooks), ``monitor`` (an ``OutlierMonitor`` measuring every forward, default
settings) and ``idle`` (hooks attached, ``enabled = False``: what a non-measured step costs).
Headline: median over rounds of time(monitor) / time(plain). Goal ≤ 1.05.

    python benchmarks/monitor_forward.py [--quick] [--d-model 192 --layers 6 --batch 16]
"""

from __future__ import annotations

import _common


def add_args(p) -> None:
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=192)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--vocab", type=int, default=257, help="257 = byte tokenizer (science §6)")
    p.add_argument("--forwards", type=int, default=None, help="forwards per timed call")


def main(argv=None) -> None:
    args = _common.parse_args(__doc__.splitlines()[0], argv, add_args, rounds=15, quick_rounds=7)
    import torch

    from outlierlab import OutlierMonitor
    from outlierlab.model import GPT, GPTConfig

    torch.manual_seed(args.seed)
    cfg = GPTConfig.preset(
        "pre-ln",
        vocab_size=args.vocab,
        n_layer=args.layers,
        d_model=args.d_model,
        n_head=args.heads,
        d_mlp=4 * args.d_model,
        seq_len=args.seq_len,
    )
    model = GPT(cfg).eval()
    idx = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    k = args.forwards or (3 if args.quick else 5)

    def forwards() -> None:
        with torch.no_grad():
            for _ in range(k):
                model(idx)

    mon = OutlierMonitor(model)

    def plain() -> None:
        forwards()

    def monitored() -> None:
        with mon:
            forwards()
        mon.reset()

    def idle() -> None:
        with mon:
            mon.enabled = False
            forwards()
            mon.enabled = True

    _common.print_machine()
    print(
        f"GPT pre-ln {args.layers}×{args.d_model}, {args.batch}×{args.seq_len} tokens, "
        f"{len(mon.points)} points, {k} forwards per call, {args.rounds} rounds",
        flush=True,
    )
    t = _common.interleave({"plain": plain, "monitor": monitored, "idle": idle}, args.rounds)
    rows = [
        [n, t.median(n) / k * 1e3, _common.spread(t.ratios(n, "plain"))]
        for n in ("plain", "monitor", "idle")
    ]
    _common.print_table(["variant", "ms / forward", "time / plain: median [min–max]"], rows)
    share = hook_share(model, idx, mon, rounds=args.rounds)
    print(
        f"time inside the hooks / rest of the forward (timed in place, robust to load): "
        f"{share:.3f} → implied ratio {1 + share:.3f}"
    )
    _common.print_headline(t.ratio("monitor", "plain"), note="goal: ratio ≤ 1.05 (every forward)")


def hook_share(model, idx, mon, rounds: int) -> float:
    """Median over forwards of (seconds inside the monitor's hooks and the attention-entropy
    recomputation) / (the rest of the forward): both halves of each ratio come from the same
    forward, so load on the machine cancels."""
    import statistics
    import time

    import torch

    spent: list[float] = []
    record = mon._record

    def timed(name, x):
        t0 = time.perf_counter()
        record(name, x)
        spent.append(time.perf_counter() - t0)

    def timed_probs(report):
        def wrapper(*args):
            t0 = time.perf_counter()
            report(*args)
            spent.append(time.perf_counter() - t0)

        return wrapper

    mon._record = timed
    attn = list(mon.attn_points.values())
    for m in attn:
        m._report_probs = timed_probs(m._report_probs)
    ratios = []
    try:
        with torch.no_grad(), mon:
            for _ in range(rounds + 1):
                spent.clear()
                t0 = time.perf_counter()
                model(idx)
                total, hooks = time.perf_counter() - t0, sum(spent)
                ratios.append(hooks / (total - hooks))
    finally:
        mon._record = record
        for m in attn:
            del m._report_probs
        mon.reset()
    return statistics.median(ratios[1:])


if __name__ == "__main__":
    main()
