"""``outlierlab quantize``: FP vs fake-quantised perplexity and the per-layer damage (SPEC §4).

Calibration batches come from the TRAIN split, perplexity from the first validation windows:
for a run folder, the run's own data config; for a Hugging Face folder (or a bare model folder),
``--data`` (default: the stdlib corpus) split by document and tokenised with the model's own
tokenizer.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path
from typing import Any

from outlierlab.cli import device, output_file
from outlierlab.errors import ConfigError, DataError, ModelLoadError
from outlierlab.fields import POSITIVE
from outlierlab.run_folder import RunFolder, write_json

DEFAULT_SCHEME = "w8a8-tensor"
HF_DEFAULT_SEQ_LEN = 256


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "quantize",
        help="perplexity of a run or HF model after simulated W8A8 (or other) quantisation",
        description="FP vs fake-quantised perplexity and the per-layer damage (SPEC §4).",
    )
    p.add_argument(
        "path", metavar="RUN_DIR_OR_HF_DIR", help="run folder, model folder, HF folder or .gguf"
    )
    p.add_argument(
        "--scheme",
        default=DEFAULT_SCHEME,
        help="w8a8-tensor (default), w8a8-dynamic, w8a8-paper, w4a8, w8a4; the options below "
        "override it",
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
    p.add_argument("--calib-batches", type=POSITIVE, default=16,
                   help="training batches (default 16)")
    p.add_argument("--batch-size", type=POSITIVE, default=8)
    p.add_argument("--seq-len", type=POSITIVE, help="window length (default: the model's context)")
    p.add_argument("--data", help="text source for HF/model folders (default: stdlib)")
    p.add_argument("--eval-windows", type=POSITIVE, default=64,
                   help="validation windows (default 64)")
    p.add_argument("--stats-windows", type=POSITIVE, default=16, help="windows for the layer table")
    p.add_argument("--device", default="cpu", type=device)
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration batch sampler")
    p.add_argument("--json", metavar="OUT", type=output_file, help="write the result as JSON here")
    p.add_argument(
        "--save",
        metavar="PATH",
        type=output_file,
        help="result JSON (default for run folders: RUN_DIR/quant/<scheme>.json)",
    )
    p.add_argument("--no-save", action="store_true", help="do not write RUN_DIR/quant/")
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


def split_tokens(
    source: str, tokenizer: Any, need_train: int, need_val: int, val_fraction: float = 0.05
) -> tuple[Any, Any]:
    """Train and validation token arrays for a model that brings its own tokenizer.

    The corpus is split by document as the data module does (:func:`split_documents`); each
    side is tokenised with the model's tokenizer (documents joined by its end-of-text id, if
    any) only until it holds ``need`` tokens (4 × for train, so calibration batches vary).
    """
    import numpy as np

    from outlierlab.data import collect, split_documents

    train_docs, val_docs = split_documents(collect(source).documents, val_fraction)

    def encode(docs, need: int) -> np.ndarray:
        ids: list[int] = []
        for doc in docs:
            ids += tokenizer.encode(doc.text)
            if tokenizer.eot_id is not None:
                ids.append(tokenizer.eot_id)
            if len(ids) >= need:
                break
        return np.asarray(ids, dtype=np.int64)

    return encode(train_docs, 4 * need_train), encode(val_docs, need_val)


def run(args: argparse.Namespace) -> int:
    if args.save and args.no_save:
        raise ConfigError("--save and --no-save contradict each other; allowed: one of them")
    cfg = build_config(args)  # user mistakes in options fail before anything loads
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
        result = evaluate(args, cfg, path, run_folder)
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


def evaluate(args: argparse.Namespace, cfg: Any, path: Path, run: RunFolder | None) -> dict:
    """Load, calibrate and evaluate; print and return the result."""
    import warnings

    import torch

    from outlierlab.data import prepare, validation_windows
    from outlierlab.loading import load_model
    from outlierlab.quant.evaluate import calibration_batches, quantize_and_evaluate

    loaded = load_model(path, device=args.device)
    print(loaded.describe())
    seq_len = args.seq_len
    if seq_len is None:
        seq_len = loaded.seq_len or HF_DEFAULT_SEQ_LEN
        if loaded.kind == "hf":
            seq_len = min(seq_len, HF_DEFAULT_SEQ_LEN)
    if loaded.seq_len is not None and seq_len > loaded.seq_len:
        raise ConfigError(f"--seq-len {seq_len} exceeds the model's context {loaded.seq_len}")

    data_cfg = None
    if args.data is None and run is not None and isinstance(run.config.get("data"), dict):
        data_cfg = run.data_config
    if data_cfg is not None:  # a run folder: its own corpus, split and tokenizer
        data = prepare(data_cfg, progress=False)
        train, val = data.train, data.val
    else:  # HF or bare model folder: --data (default stdlib) with the model's tokenizer
        need_train = args.calib_batches * args.batch_size * seq_len + 1
        train, val = split_tokens(
            args.data or "stdlib", loaded.tokenizer, need_train, args.eval_windows * seq_len + 1
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer windows than asked: reported in the result
        val_x, val_y = validation_windows(val, seq_len, args.eval_windows)
    calib = calibration_batches(train, seq_len, args.batch_size, args.calib_batches, args.seed)
    vocab = int(max(val_x.max(), max(int(b.max()) for b in calib))) + 1
    out_vocab = loaded.logits(val_x[:1, :2].to(args.device)).shape[-1]
    if vocab > out_vocab:
        raise DataError(
            f"the data holds token id {vocab - 1} but the model's vocabulary is {out_vocab}"
        )

    with torch.no_grad():
        result = quantize_and_evaluate(
            loaded.model, cfg, calib, val_x, val_y, args.batch_size, args.stats_windows
        )
    step = {"step": loaded.step} if loaded.step is not None else {}
    result = {"model": str(path), "kind": loaded.kind, **step, **result}
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
                f"[{row['act_min']:.3g}, {row['act_max']:.3g}]",
                _fmt(row["act_sqnr_db"]),
                _fmt(row["weight_sqnr_db"]),
            )
        console.print(table)
    console.print(
        f"scheme {result['scheme']}  windows {result['eval_windows']}×{result['seq_len']}  "
        f"calib {result['calib_batches']} train batches"
    )
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
