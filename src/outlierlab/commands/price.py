"""``outlierlab price MODEL``: one page with what the model's outlier features cost under
W8A8 schemes (``w8a8-tensor``, ``w8a8-dynamic``, ``w8a8-paper``, SmoothQuant α 0.5 / 0.8, a
rotation baseline), the per-layer Kurt and max |x|, where the massive activations sit, the
attention sinks and the per-layer SQNR. See :mod:`outlierlab.price` and docs/real-models.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from outlierlab.cli import device, output_dir
from outlierlab.errors import ConfigError, DataError
from outlierlab.fields import POSITIVE

DEFAULT_SEQ_LEN = 512


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "price",
        help="one page: what outlier features cost under W8A8 schemes (ppl, SQNR, sinks)",
        description="Profile a model's massive activations and price them under W8A8 schemes; "
        "writes price.md, price.html, price.json and figures.",
    )
    p.add_argument("model", metavar="MODEL", help="run folder, model folder, HF folder or .gguf")
    p.add_argument("--data", help="text source (default: a run's own data, else stdlib)")
    p.add_argument("--out", metavar="DIR", type=output_dir,
                   help="output folder (default: price-<model name>)")
    p.add_argument("--eval-windows", type=POSITIVE, default=8,
                   help="validation windows (default 8)")
    p.add_argument("--stats-windows", type=POSITIVE, default=4, help="windows for the profile and "
                   "the per-layer SQNR (default 4)")  # fmt: skip
    p.add_argument("--seq-len", type=POSITIVE, help=f"window length (default {DEFAULT_SEQ_LEN}, or "
                   "the model's context if shorter)")  # fmt: skip
    p.add_argument("--calib-batches", type=POSITIVE, default=2, help="training batches (default 2)")
    p.add_argument("--batch-size", type=POSITIVE, default=4, help="windows per forward (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration batch sampler")
    p.add_argument("--device", default="cpu", type=device)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from outlierlab.commands.quantize import split_tokens
    from outlierlab.data import prepare, validation_windows
    from outlierlab.loading import load_model
    from outlierlab.price import run_price, schemes, write_page
    from outlierlab.quant import calibration_batches
    from outlierlab.run_folder import RunFolder

    path = Path(args.model)
    loaded = load_model(path, device=args.device)
    seq_len = args.seq_len or min(DEFAULT_SEQ_LEN, loaded.seq_len or DEFAULT_SEQ_LEN)
    if seq_len < 2 or (loaded.seq_len is not None and seq_len > loaded.seq_len):
        raise ConfigError(f"--seq-len {seq_len} must be in 2..{loaded.seq_len or 'any'}")
    run = RunFolder(path) if args.data is None and path.is_dir() else None
    data_cfg = run.data_config if run is not None and run.is_run else None
    if data_cfg is not None:
        data = prepare(data_cfg, progress=False)
        train, val = data.train, data.val
    else:
        need_train = args.calib_batches * args.batch_size * seq_len + 1
        train, val = split_tokens(
            args.data or "stdlib", loaded.tokenizer, need_train, args.eval_windows * seq_len + 1
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        val_x, val_y = validation_windows(val, seq_len, args.eval_windows)
    if val_x.shape[0] == 0:
        raise DataError(f"the validation text holds fewer than {seq_len + 1} tokens")
    calib = calibration_batches(train, seq_len, args.batch_size, args.calib_batches, args.seed)
    out = Path(args.out or f"price-{path.stem if path.is_file() else path.name}")
    steps = ["profile", "FP perplexity"] + [label for label, _ in schemes()]
    with _progress(args.quiet, len(steps)) as step:
        res = run_price(loaded.model, calib, val_x, val_y, args.batch_size, args.stats_windows,
                        step=step)  # fmt: skip
    res["model"] = str(path)
    paths = write_page(res, out, title=f"What outlier features cost: {path.name}")
    _print_summary(res, paths)
    return 0


class _progress:
    """A rich progress bar over the pipeline's stages (nothing with ``quiet``)."""

    def __init__(self, quiet: bool, total: int) -> None:
        self.quiet, self.total = quiet, total

    def __enter__(self):
        if self.quiet:
            return lambda label: None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn(
            "{task.completed}/{task.total}"), TimeElapsedColumn(), transient=True)  # fmt: skip
        self.bar.__enter__()
        task = self.bar.add_task("price: profile", total=self.total)
        return lambda label: self.bar.update(task, advance=1, description=f"price: {label} done")

    def __exit__(self, *exc: object) -> None:
        if not self.quiet:
            self.bar.__exit__(*exc)


def _print_summary(res: dict[str, Any], paths: dict[str, Path]) -> None:
    from rich.console import Console
    from rich.table import Table

    from outlierlab.price import scheme_table

    header, rows = scheme_table(res)
    table = Table(title=f"{res['model']}: {res['eval_windows']}×{res['seq_len']} tokens")
    for col in header:
        table.add_column(col, justify="left" if col in ("scheme",) else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(width=max(100, Console().width))
    console.print(table)
    console.print(f"page: {paths['html']}  ({paths['md'].name}, {paths['json'].name}); "
                  f"{res['seconds']:.0f} s")  # fmt: skip
