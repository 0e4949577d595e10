"""``outlierlab price MODEL``: one page with what the model's outlier features cost: by default
under ``w8a8-tensor``, ``w8a8-dynamic``, ``fp8-dynamic`` and ``w4a16-rtn``
(:data:`outlierlab.price.DEFAULT_SCHEMES`); with ``--schemes all`` also ``w8a8-outputs``,
SmoothQuant α 0.5 / 0.8 / searched, a rotation baseline, ``fp8-tensor``, ``w4a16-gptq`` and
``w4a4-quarot``; plus the per-layer Kurt and max |x|, where the massive activations sit, the
attention sinks and the per-layer SQNR. ``--sensitivity [SCHEME]`` adds which blocks and linears
do the damage, the verified 16-bit recommendation and which measurement predicts the damage;
``--crosscheck`` our ``w8a8-dynamic`` against torchao's real int8 path; ``--full`` both.
``price A B`` writes each page and a compare page side by side. The page opens with a headline.
See :mod:`outlierlab.price`, docs/quant.md and docs/real-models.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from outlierlab.cli import device, output_dir
from outlierlab.commands.quantize import add_data_options
from outlierlab.fields import POSITIVE


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "price",
        help="one page: what outlier features cost under W8A8, FP8, W4A16, W4A4 schemes",
        description="Profile a model's massive activations and price them under W8A8, FP8, "
        "W4A16 (RTN, GPTQ), W4A4 (QuaRot) and SmoothQuant schemes; "
        "writes price.md, price.html, price.json and figures.",
    )
    p.add_argument("model", metavar="MODEL", nargs="+",
                   help="run folder, model folder, HF folder or .gguf; two or more: each page "
                   "and a compare page side by side")
    p.add_argument("--out", metavar="DIR", type=output_dir,
                   help="output folder (default: price-<model name>, or price-<A>-vs-<B>)")
    add_data_options(p)
    p.add_argument("--device", default="cpu", type=device)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--schemes", nargs="+", metavar="LABEL",
                   help="the page's rows (default: w8a8-tensor w8a8-dynamic fp8-dynamic "
                   "w4a16-rtn; 'all': every row, adding w8a8-outputs, SmoothQuant α 0.5 / 0.8 / "
                   "searched, the rotation baseline, fp8-tensor, w4a16-gptq, w4a4-quarot)")
    p.add_argument("--sensitivity", nargs="?", const="w8a8-tensor", metavar="SCHEME",
                   help="layer sensitivity under SCHEME (default w8a8-tensor): which blocks and "
                   "linears do the damage, the smallest 16-bit set verified to recover 90 %% of "
                   "it, and which measurement predicts the damage (Spearman ρ)")
    p.add_argument("--sensitivity-windows", type=POSITIVE, default=2, metavar="N",
                   help="of the evaluation windows, how many the sensitivity search uses "
                   "(default 2: it runs about 80 evaluations; the recommendation is then "
                   "checked on every window)")
    p.add_argument("--crosscheck", action="store_true",
                   help="our w8a8-dynamic perplexity against torchao's real int8 path (needs "
                   "pip install 'outlierlab[crosscheck]')")
    p.add_argument("--full", action="store_true",
                   help="everything: --sensitivity and --crosscheck with the chosen rows")
    p.add_argument("--no-figures", action="store_true",
                   help="tables only, no PNG figures (faster: for many models in a row)")
    p.set_defaults(func=run)


def _name(path: Path) -> str:
    return path.stem if path.is_file() else path.name


def run(args: argparse.Namespace) -> int:
    from outlierlab.errors import ConfigError
    from outlierlab.price import check_sensitivity_scheme, row_labels, write_compare

    # everything a user can get wrong is checked before a model is loaded
    chosen = row_labels(args.schemes)
    sensitivity = args.sensitivity or ("w8a8-tensor" if args.full else None)
    if sensitivity is not None:
        check_sensitivity_scheme(sensitivity)
    crosscheck = args.crosscheck or args.full
    if crosscheck:
        from outlierlab.quant.crosscheck import torchao_available

        if not torchao_available():
            raise ConfigError("--crosscheck needs torchao; install it with "
                              "pip install 'outlierlab[crosscheck]' (torchao>=0.18)")  # fmt: skip
    paths = [Path(m) for m in args.model]
    if len({p.resolve() for p in paths}) < len(paths):
        raise ConfigError("price A B: the same model twice; give different models to compare")
    names = [_name(p) for p in paths]
    if len(paths) == 1:
        out = Path(args.out or f"price-{names[0]}")
        _one(args, paths[0], out, chosen, sensitivity, crosscheck)
        return 0
    out = Path(args.out or "price-" + "-vs-".join(names))
    dirs = [out / (n if names.count(n) == 1 else f"{i}-{n}") for i, n in enumerate(names)]
    results = [_one(args, p, d, chosen, sensitivity, crosscheck) for p, d in zip(paths, dirs)]
    page = write_compare(results, [d.name for d in dirs], out)
    print(f"compare page: {page['html']}  ({page['md'].name}, {page['json'].name})")
    return 0


def _one(args: argparse.Namespace, path: Path, out: Path, chosen: list[str],
         sensitivity: str | None, crosscheck: bool) -> dict[str, Any]:  # fmt: skip
    """One model's page in ``out``; returns its result."""
    from outlierlab.model_data import eval_set
    from outlierlab.price import run_price, write_page

    ev = eval_set(path, args.device, args.points, args.data, args.seq_len, args.eval_windows,
                  args.calib_batches, args.batch_size, args.seed)  # fmt: skip
    steps = ["profile", "FP perplexity", *chosen, *(["sensitivity"] if sensitivity else []),
             *(["crosscheck"] if crosscheck else [])]  # fmt: skip
    with _progress(args.quiet, len(steps)) as step:
        res = run_price(ev.loaded.model, ev.calib, ev.val_x, ev.val_y, args.batch_size,
                        args.stats_windows, progress=step, points=ev.points, labels=chosen,
                        sensitivity=sensitivity, crosscheck=crosscheck,
                        sensitivity_windows=args.sensitivity_windows)  # fmt: skip
    res["model"] = str(path)
    res["data"] = ev.data.source
    paths = write_page(res, out, title=f"What outlier features cost: {path.name}",
                       figures=not args.no_figures)  # fmt: skip
    _print_summary(res, paths)
    return res


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
    console.print(" ".join(res.get("headline") or []))
    console.print(table)
    console.print(f"page: {paths['html']}  ({paths['md'].name}, {paths['json'].name}); "
                  f"{res['seconds']:.0f} s")  # fmt: skip
