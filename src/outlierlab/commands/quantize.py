"""``outlierlab quantize``: FP vs fake-quantised perplexity and the per-layer damage (science §4).

Calibration batches come from the TRAIN split, perplexity from the first validation windows,
both from :mod:`outlierlab.model_data` (the loader and defaults ``measure`` and ``price`` share):
for a run folder, the run's own data; otherwise ``--data`` (default stdlib) split by document and
tokenised with the model's own tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from outlierlab.cli import device, output_file
from outlierlab.errors import ConfigError, ModelLoadError
from outlierlab.fields import POSITIVE
from outlierlab.jsonable import write_json
from outlierlab.run_folder import RunFolder

DEFAULT_SCHEME = "w8a8-tensor"


def add_data_options(p: Any) -> None:
    """The text and window options ``quantize`` and ``price`` share, with the defaults of
    :mod:`outlierlab.model_data`."""
    from outlierlab import model_data as md

    p.add_argument("--data", metavar="SOURCE", help="text: stdlib, a file, folder, glob or "
                   ".jsonl, split by document (default: a run's own data, else stdlib)")
    p.add_argument("--seq-len", type=POSITIVE, help=f"window length (default "
                   f"{md.DEFAULT_SEQ_LEN}, or the model's context if shorter)")
    p.add_argument("--eval-windows", type=POSITIVE, default=md.DEFAULT_EVAL_WINDOWS,
                   help=f"validation windows for perplexity (default {md.DEFAULT_EVAL_WINDOWS})")
    p.add_argument("--stats-windows", type=POSITIVE, default=md.DEFAULT_STATS_WINDOWS,
                   help="of those, windows for the per-layer tables (default "
                   f"{md.DEFAULT_STATS_WINDOWS})")
    p.add_argument("--calib-batches", type=POSITIVE, default=md.DEFAULT_CALIB_BATCHES,
                   help=f"calibration batches from the train split (default "
                   f"{md.DEFAULT_CALIB_BATCHES})")
    p.add_argument("--batch-size", type=POSITIVE, default=md.DEFAULT_BATCH_SIZE,
                   help=f"windows per batch (default {md.DEFAULT_BATCH_SIZE})")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration batch sampler")
    p.add_argument("--points", nargs="+", metavar="GLOB", help="where to measure Kurt instead "
                   "of the residual stream: module-name globs (as measure --points)")


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="perplexity of a run or HF model after simulated W8A8 (or other) quantisation",
        description="FP vs fake-quantised perplexity and the per-layer damage (science §4).",
    )
    p.add_argument(
        "path", metavar="RUN_DIR_OR_HF_DIR", help="run folder, model folder, HF folder or .gguf"
    )
    p.add_argument(
        "--scheme",
        default=DEFAULT_SCHEME,
        help="w8a8-tensor (default), w8a8-dynamic, w8a8-outputs, w8a8-paper (Bondarenko et al.'s "
        "sites, outlierlab GPTs), w4a8, w8a4, w8a6-tensor, w6a6-tensor, fp8-tensor, fp8-dynamic "
        "(FP8 E4M3), w4a16-rtn, w4a16-gptq (weight-only, groups of 128), w4a4-quarot (rotated, "
        "GPTQ weights; Llama family and outlierlab's GPT), "
        "w4a4-online (the same rotation, RTN weights), smoothquant-search (α picked on "
        "calibration data); the options below override it (docs/quant.md)",
    )
    p.add_argument("--w-bits", type=int, help="weight bits, 2..16 (16 ≈ full precision)")
    p.add_argument("--a-bits", type=int, help="activation bits, 2..16")
    p.add_argument("--w-granularity", choices=["tensor", "channel"])
    p.add_argument("--w-range", choices=["minmax", "mse"])
    p.add_argument(
        "--w-symmetric", action=argparse.BooleanOptionalAction, default=None, help="weight grid"
    )
    p.add_argument("--a-granularity", choices=["tensor", "token"], help="static or per-token")
    p.add_argument("--a-range", choices=["minmax", "percentile"], help="static range method")
    p.add_argument("--a-percentile", type=float, help="e.g. 99.999 (with --a-range percentile)")
    p.add_argument(
        "--a-symmetric", action=argparse.BooleanOptionalAction, default=None, help="act. grid"
    )
    p.add_argument("--quantize-head", action="store_true", help="quantise the LM head too")
    p.add_argument(
        "--quantize-residual",
        action="store_true",
        help="also quantise the residual stream (embedding output and every block output)",
    )
    p.add_argument("--smooth", type=float, metavar="ALPHA", help="SmoothQuant migration, 0..1")
    add_data_options(p)
    p.add_argument("--device", default="cpu", type=device)
    p.add_argument("--json", metavar="OUT", type=output_file, help="write the result as JSON here")
    p.add_argument(
        "--save",
        metavar="PATH",
        type=output_file,
        help="result JSON (default for run folders: RUN_DIR/quant/<scheme>.json)",
    )
    p.add_argument("--no-save", action="store_true", help="do not write RUN_DIR/quant/")
    p.add_argument("--predictors", action="store_true",
                   help="also which measurement predicts each block's damage: the layer "
                   "sensitivity on 2 windows and Spearman ρ of Kurt, max/median, SQNR, ... "
                   "against it (docs/real-models.md; schemes without a rotation)")
    p.add_argument("--quiet", action="store_true", help="no per-layer table")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace):
    """The QuantConfig of ``--scheme`` with every given option applied."""
    from outlierlab.quant.config import scheme

    overrides = {
        "w_bits": args.w_bits,
        "a_bits": args.a_bits,
        "w_granularity": args.w_granularity,
        "w_range": args.w_range,
        "w_symmetric": args.w_symmetric,
        "a_granularity": args.a_granularity,
        "a_range": args.a_range,
        "a_percentile": args.a_percentile,
        "a_symmetric": args.a_symmetric,
        "smooth_alpha": args.smooth,
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.quantize_head:
        overrides["quantize_head"] = True
    if args.quantize_residual:
        overrides["quantize_residual"] = True
    return scheme(args.scheme, **overrides)


def run(args: argparse.Namespace) -> int:
    if args.save and args.no_save:
        raise ConfigError("--save and --no-save contradict each other; allowed: one of them")
    cfg = build_config(args)  # user mistakes in options fail before anything loads
    if args.predictors:
        from outlierlab.price import check_sensitivity_scheme

        check_sensitivity_scheme(args.scheme, "--predictors")
    path = Path(args.path)
    if not path.is_dir() and path.suffix.lower() != ".gguf":
        raise ModelLoadError(
            f"{path} {'is not a folder' if path.exists() else 'does not exist'}; expected a "
            "run folder, an HF model folder or a .gguf file"
        )
    run_folder = RunFolder(path)
    if not run_folder.is_run:
        run_folder = None
    else:
        _check_status(run_folder)
    save = args.save
    if save is None and not args.no_save and run_folder is not None:
        save = str(run_folder.quant_file(cfg.name))
    with contextlib.ExitStack() as stack:
        if run_folder is not None and save:  # it writes into the run folder: own it meanwhile
            stack.enter_context(run_folder.lock("outlierlab quantize --save"))
        result = quantize_run(args, cfg, path)
        for out in {p for p in (args.json, save) if p}:
            write_json(out, result)
    return 0


def _check_status(run: RunFolder) -> None:
    """A diverged or crashed run has no trustworthy weights to price: refuse by name."""
    status = run.status
    if status.get("status") in ("diverged", "crashed"):
        why = f" ({status['message']})" if status.get("message") else ""
        raise ModelLoadError(
            f"{run.path} {status['status']}{why}; quantize a finished or interrupted run, or "
            f"pass one of its {run.checkpoints.name}/step-N folders to price that checkpoint"
        )


def quantize_run(args: argparse.Namespace, cfg: Any, path: Path) -> dict:
    """Load, check the structure, calibrate and evaluate; print and return the result."""
    import torch

    from outlierlab.model_data import eval_set
    from outlierlab.quant import CalibCache
    from outlierlab.quant.evaluate import quantize_and_evaluate
    from outlierlab.quant.predictors import measure_predictors

    ev = eval_set(path, args.device, args.points, args.data, args.seq_len, args.eval_windows,
                  args.calib_batches, args.batch_size, args.seed)  # fmt: skip
    cache = CalibCache()
    with torch.no_grad():
        result = quantize_and_evaluate(ev.loaded.model, cfg, ev.calib, ev.val_x, ev.val_y,
                                       args.batch_size, args.stats_windows, cache=cache,
                                       points=ev.points)  # fmt: skip
    if args.predictors:
        result["predictors"] = measure_predictors(
            ev.loaded.model, cfg, ev.calib, ev.val_x, ev.val_y, args.batch_size,
            args.stats_windows, points=ev.points, cache=cache)
    step = {"step": ev.loaded.step} if ev.loaded.step is not None else {}
    result = {"model": str(path), "kind": ev.loaded.kind, **step, "data": ev.data.source,
              **result}  # fmt: skip
    _print(result, quiet=args.quiet)
    return result


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "—" if v is None else format(v, spec)


def _print(result: dict[str, Any], quiet: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    fp, q = result["fp_ppl"], result["quant_ppl"]
    if not quiet:
        table = Table(
            title=f"{result['scheme']}: per-layer damage ({result['stats_windows']} windows)"
        )
        for col in ("layer", "Kurt", "act range", "act SQNR dB", "w SQNR dB"):
            table.add_column(col, justify="left" if col == "layer" else "right")
        for row in result["layers"]:
            table.add_row(
                row["name"],
                _fmt(row["kurtosis"], ".2f"),
                "—" if row["act_min"] is None else f"[{row['act_min']:.3g}, {row['act_max']:.3g}]",
                _fmt(row["act_sqnr_db"]),
                _fmt(row["weight_sqnr_db"]),
            )
        console.print(table)
    console.print(
        f"scheme {result['scheme']}  windows {result['eval_windows']}×{result['seq_len']}  "
        f"calib {result['calib_batches']} train batches"
    )
    if "smooth_search_ce" in result:
        tried = "  ".join(f"{a}: {v:.4f}" for a, v in result["smooth_search_ce"].items())
        console.print(f"SmoothQuant α     {result['smooth_alpha']} (calibration CE  {tried})")
    console.print(f"FP perplexity     {fp:.3f}")
    console.print(f"quant perplexity  {q:.3f}")
    console.print(f"increase          {q - fp:+.3f} ({100 * (q / fp - 1):+.2f}%)")
    console.print(
        f"residual Kurt     mean {result['kurtosis_mean']:.2f}  max {result['kurtosis_max']:.2f}"
    )
    ratio = result["eval_time_ratio"]
    console.print(
        f"eval time         FP {result['fp_eval_s']:.2f}s  quant {result['quant_eval_s']:.2f}s"
        + ("" if ratio is None else f"  (×{ratio:.2f})")
    )
    pred = result.get("predictors")
    if pred is not None:
        _print_predictors(pred, console)


def _print_predictors(pred: dict[str, Any], console: Any) -> None:
    """The predictor table (``--predictors``) and the verified recommendation."""
    from rich.table import Table

    from outlierlab.price import predictor_rows

    header, rows = predictor_rows({"predictors": pred})  # the rows of price's page
    table = Table(title=f"which measurement predicts a block's damage ({pred['windows']} "
                  f"windows, {len(pred['blocks'])} blocks)")  # fmt: skip
    for i, col in enumerate(header):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    rec = pred["verified_recovery"]
    console.print(f"16-bit set        {len(pred['keep_16bit'])} of {pred['linears']} linears "
                  f"recover {_fmt(None if rec is None else 100 * rec)} % of the KL")
