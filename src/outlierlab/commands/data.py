"""``outlierlab data prepare``: collect, split, tokenise and cache a corpus; print a summary."""

from __future__ import annotations

import argparse
import json
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "data",
        help="prepare a corpus: collect, split, tokenise, cache",
        description="Corpus and token cache (see docs/data.md).",
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    prep = actions.add_parser(
        "prepare",
        help="build (or find) the token cache of a corpus and print a summary",
        description=(
            "Collect the documents of --source, split them by file into train/validation, "
            "tokenise them and store the tokens in the cache ($OUTLIERLAB_CACHE or "
            "~/.cache/outlierlab). A second call with the same inputs reuses the cache."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    prep.add_argument(
        "--source",
        default="stdlib",
        help="'stdlib' (this Python's standard library), a file, a folder, a glob, a .jsonl "
        "or a local Hugging Face datasets folder",
    )
    prep.add_argument(
        "--tokenizer", default="bytes", help="'bytes', 'bpe' or a path to a tokenizer.json"
    )
    prep.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary size")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share held out")
    prep.add_argument(
        "--include-tests", action="store_true", help="stdlib: include the test packages"
    )
    prep.add_argument("--text-field", default="text", help="JSONL/datasets text field")
    prep.add_argument("--cache-dir", help="cache root (default $OUTLIERLAB_CACHE or ~/.cache)")
    prep.add_argument("--json", action="store_true", help="print the summary as JSON")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(func=run_prepare)
    p.set_defaults(func=lambda args: _usage(p))


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def format_summary(s: dict) -> str:
    """The human-readable summary printed by ``outlierlab data prepare``."""
    if s["built"]:
        how = f"built in {s['seconds']:.2f} s"
    else:
        how = f"reused, {s['seconds']:.2f} s"
    dropped = f"{s['duplicates']} duplicate(s), {s['skipped_non_utf8']} not UTF-8 skipped"
    rows = [
        ("source", s["source"]),
        (
            "files",
            f"{s['files']:,} ({s['train_files']:,} train, {s['val_files']:,} val); {dropped}",
        ),
        ("bytes", f"{s['bytes']:,}"),
        ("tokenizer", f"{s['tokenizer']} (vocab {s['vocab_size']:,}, stored as {s['dtype']})"),
        ("tokens", f"train {s['train_tokens']:,}  val {s['val_tokens']:,}"),
        ("fingerprint", s["fingerprint"]),
        ("cache", f"{s['cache']} ({how})"),
    ]
    return "\n".join(f"{k:<12} {v}" for k, v in rows)


def run_prepare(args: argparse.Namespace) -> int:
    from outlierlab.data import DataConfig, prepare

    cfg = DataConfig(
        source=args.source,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        val_fraction=args.val_fraction,
        include_tests=args.include_tests,
        text_field=args.text_field,
        cache_dir=args.cache_dir,
    )
    start = time.perf_counter()
    data = prepare(cfg, progress=not (args.quiet or args.json))
    summary = data.summary()
    summary["seconds"] = round(time.perf_counter() - start, 3)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
