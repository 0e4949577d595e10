"""What ``w8a8-paper`` (Bondarenko et al.'s sites, issue 23) costs against ``w8a8-tensor`` in the
``cpu`` preset's quantisation step.

A fresh GPT of the ``cpu`` preset's size (Pre-LN, 4 × 128, 4 heads, context 128, byte
vocabulary; timing does not depend on the weights), the preset's evaluation (16 calibration
batches of 8, 64 validation windows, 16 for the per-layer table; random tokens), and
:func:`outlierlab.quant.quantize_and_evaluate` (wrap + calibrate + evaluate + table) for each
scheme, interleaved (``_common.interleave``). Headline: time(w8a8-paper) / time(w8a8-tensor).

    python benchmarks/quant_paper.py [--quick] [--rounds N]
"""

from __future__ import annotations

import _common


def main(argv=None) -> float:
    args = _common.parse_args(__doc__.splitlines()[0], argv, rounds=3, quick_rounds=1)
    _common.print_machine()
    import torch

    from outlierlab.model import GPT, GPTConfig
    from outlierlab.quant import quantize_and_evaluate, scheme

    torch.manual_seed(args.seed)
    cfg = GPTConfig.preset("pre-ln", n_layer=4, d_model=128, n_head=4, seq_len=128)
    model = GPT(cfg).eval()
    g = torch.Generator().manual_seed(args.seed)
    calib = [torch.randint(0, cfg.vocab_size, (8, 128), generator=g) for _ in range(16)]
    x = torch.randint(0, cfg.vocab_size, (64, 129), generator=g)
    val_x, val_y = x[:, :-1], x[:, 1:]
    fp = {"ppl": 1.0, "loss": 0.0, "seconds": 1.0}  # the FP evaluation is shared: left out

    def run(name: str):
        return lambda: quantize_and_evaluate(model, scheme(name), calib, val_x, val_y,
                                             batch_size=8, stats_windows=16, fp=fp)

    t = _common.interleave({s: run(s) for s in ("w8a8-tensor", "w8a8-paper")}, args.rounds,
                           warmup=0 if args.quick else 1)
    _common.print_table(["scheme", "median s"],
                        [[s, f"{t.median(s):.2f}"] for s in t.names])
    ratio = t.ratio("w8a8-paper", "w8a8-tensor")
    _common.print_headline(ratio, f"w8a8-paper / w8a8-tensor per run: "
                                  f"{_common.spread(t.ratios('w8a8-paper', 'w8a8-tensor'))}")
    return ratio


if __name__ == "__main__":
    main()
