"""W8A8 fake-quantised evaluation vs full-precision evaluation time.

The same GPT (the default preset, 6 × 192; ``--size 135m``: a fresh GPT of SmolLM2-135M's shape,
30 × 576, 9 heads, MLP 1536, vocabulary 49152, 8 windows × 512 tokens; or ``--run PATH``: a
trained run, model folder, HF folder or .gguf file),
the same fixed validation windows, :func:`outlierlab.quant.perplexity` on the FP model and on
its wrapped, calibrated copies (``w8a8-tensor``: static per-tensor activations, the paper's
setting; ``w8a8-dynamic``: per-token dynamic activations), interleaved in alternating order
(``_common.interleave``). Wrapping and calibration (4 train batches, forwards stopped at the LM
head) are one-off costs, reported, not in the ratio; "quantise + evaluate" adds them to one
quantised evaluation (issue 15's goal for 135m: ≤ 60 s). Headline: time(w8a8-tensor) /
time(FP). Goal ≤ 1.5×.

    python benchmarks/quant_eval.py [--quick] [--size default|135m] [--run PATH] [--windows N]
"""

from __future__ import annotations

import time

import _common

SCHEMES = ("w8a8-tensor", "w8a8-dynamic")
SIZES = {  # GPTConfig overrides of the pre-ln preset; None: the preset itself
    "default": None,
    "135m": dict(n_layer=30, d_model=576, n_head=9, d_mlp=1536, vocab_size=49152, seq_len=512),
}


def main(argv=None) -> float:
    def add(p):
        p.add_argument("--run", default=None, help="a run, model or HF folder or .gguf file "
                       "(default: a fresh GPT; timing does not depend on the weights)")
        p.add_argument("--size", choices=list(SIZES), default="default",
                       help="fresh GPT size (135m: SmolLM2-135M's shape)")
        p.add_argument("--windows", type=int, default=None,
                       help="validation windows per evaluation (default 64, --quick 16; 135m: 8)")
        p.add_argument("--batch-size", type=int, default=8)

    args = _common.parse_args(__doc__.splitlines()[0], argv, add, rounds=7, quick_rounds=3)
    _common.print_machine()
    import torch

    from outlierlab.data import DataConfig, prepare, validation_windows
    from outlierlab.quant import calibrate, calibration_batches, logits_of, perplexity, scheme, wrap

    data = prepare(DataConfig(), progress=False)
    if args.run:
        from outlierlab.loading import load_model

        loaded = load_model(args.run)
        model, seq_len, what = loaded.model, min(loaded.seq_len or 512, 512), args.run
    else:
        from outlierlab.model import GPT, GPTConfig

        torch.manual_seed(args.seed)
        size = SIZES[args.size] or dict(vocab_size=data.tokenizer.vocab_size)
        cfg = GPTConfig.preset("pre-ln", **size)
        model = GPT(cfg).eval()
        seq_len = cfg.seq_len
        what = f"fresh GPT {cfg.n_layer}×{cfg.d_model}, vocab {cfg.vocab_size}, T={seq_len}"
    windows = args.windows or (8 if args.size == "135m" else 16 if args.quick else 64)
    x, y = validation_windows(data.val, seq_len, windows)
    calib = calibration_batches(data.train, seq_len, args.batch_size, 4, seed=args.seed)
    bs = args.batch_size

    variants = {"fp": lambda: perplexity(model, x, y, bs)}
    setup, ppl = {}, {"fp": perplexity(model, x, y, bs)[0]}
    for name in SCHEMES:
        t0 = time.perf_counter()
        q = wrap(model, scheme(name))
        calibrate(q, scheme(name), calib, logits_of)
        setup[name] = time.perf_counter() - t0
        ppl[name] = perplexity(q, x, y, bs)[0]
        variants[name] = lambda q=q: perplexity(q, x, y, bs)
    print(f"model: {what}; {windows} windows × {seq_len} tokens, batch {bs}", flush=True)
    t = _common.interleave(variants, args.rounds, warmup=1)
    rows = [["fp", t.median("fp"), "1", f"{ppl['fp']:.3f}", "-", "-"]]
    for name in SCHEMES:
        total = setup[name] + t.median(name)
        rows.append([name, t.median(name), _common.spread(t.ratios(name, "fp")),
                     f"{ppl[name]:.3f}", f"{setup[name]:.2f} s", f"{total:.1f} s"])  # fmt: skip
    _common.print_table(
        ["evaluation", "median s", "time / FP, median [min–max]", "ppl", "wrap + calibrate",
         "quantise + evaluate"],
        rows,
    )  # fmt: skip
    head = t.ratio("w8a8-tensor", "fp")
    _common.print_headline(head, f"goal ≤ 1.5×: {'met' if head <= 1.5 else 'NOT met'}")
    return head


if __name__ == "__main__":
    main()
