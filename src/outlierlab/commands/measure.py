"""``outlierlab measure MODEL_DIR``: per-layer outlier-feature metrics of a model on text.

Loads an outlierlab run/model folder or a local Hugging Face folder (offline), tokenises the
text with the model's own tokenizer into windows of ``--seq-len`` tokens, runs the
:class:`~outlierlab.monitor.OutlierMonitor` over them and prints Kurt (Eq. 1), MMR (Eq. 2),
token cosine similarity and the top outlier neurons per point (``--authors``: also the
authors' kurtosis and batch correlation), then the attention entropy per layer where the model
exposes it. See docs/measure.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from outlierlab.cli import device, output_file
from outlierlab.errors import ConfigError, DataError
from outlierlab.fields import POSITIVE
from outlierlab.run_folder import RunFolder, write_json

DEFAULT_SEQ_LEN = 128
DEFAULT_MAX_TOKENS = 16384


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "measure",
        help="outlier-feature metrics per layer of a model on text",
        description="Per-layer outlier-feature metrics (Kurt, MMR, cos-sim, outlier neurons) of a "
        "model on text.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="run folder, saved GPT or HF folder")
    p.add_argument(
        "--data",
        metavar="TEXTFILE_OR_DIR",
        help="text to measure on (a file, or a folder of text files); default: a run folder's "
        "own validation split, else the stdlib corpus's validation split",
    )
    p.add_argument(
        "--seq-len",
        type=POSITIVE,
        default=None,
        help=f"tokens per window (default {DEFAULT_SEQ_LEN}, or the model's context if shorter)",
    )
    p.add_argument(
        "--max-tokens",
        type=POSITIVE,
        default=DEFAULT_MAX_TOKENS,
        help=f"measure at most this many tokens (default {DEFAULT_MAX_TOKENS})",
    )
    p.add_argument("--batch-size", type=POSITIVE, default=8,
                   help="windows per forward (default 8)")
    p.add_argument(
        "--json", metavar="OUT", type=output_file, help="also write the results as JSON to OUT"
    )
    p.add_argument(
        "--points",
        nargs="+",
        metavar="GLOB",
        help="measure these modules instead of the residual stream: glob patterns over module "
        "names ('*' within one dotted part, '**' across parts)",
    )
    p.add_argument("--top", type=POSITIVE, default=5,
                   help="outlier neurons shown per row (default 5)")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also the massive-activation profile: top |x| with (token, channel), max/median, "
        "Kurt without the first token, OSP kurtosis, attention sinks (docs/measure.md)",
    )
    p.add_argument(
        "--authors",
        action="store_true",
        help="also show the authors' metrics: their kurtosis (Kurt − 1 of token-centred x, "
        "unbiased) and batch_corr_mean (always in --json)",
    )
    p.add_argument("--device", default="cpu", type=device, help="torch device (default cpu)")
    p.set_defaults(func=run)


def read_text(path: Path) -> list[str]:
    """The documents under ``path``: the file itself, or every non-hidden text file below a
    folder (sorted; files that are not UTF-8 text are skipped)."""
    if not path.exists():
        raise DataError(f"--data {path} does not exist")
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*")
        if f.is_file() and not any(part.startswith(".") for part in f.relative_to(path).parts)
    )  # fmt: skip
    docs, not_utf8 = [], []
    for f in files:
        try:
            text = f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            not_utf8.append(f)
            continue
        except OSError:
            continue
        if "\x00" not in text and text.strip():
            docs.append(text)
    if not docs:
        if not_utf8:
            raise DataError(f"--data {path} holds no UTF-8 text ({len(not_utf8)} file(s) are "
                            f"not UTF-8, e.g. {not_utf8[0]}); allowed: UTF-8 text files")
        raise DataError(f"--data {path} holds no text")
    return docs


def windows(tokenizer: Any, docs: list[str], seq_len: int, max_tokens: int):
    """Documents → int64 (n, T) windows: the token stream (documents joined by the tokenizer's
    end-of-text id when it has one) cut into consecutive windows of ``seq_len``, at most
    ``max_tokens // seq_len`` of them; a stream shorter than one window gives one short window."""
    import torch

    stream: list[int] = []
    for i, doc in enumerate(docs):
        if i and tokenizer.eot_id is not None:
            stream.append(tokenizer.eot_id)
        stream.extend(tokenizer.encode(doc))
        if len(stream) >= max(max_tokens, seq_len):
            break  # the rest would be cut off below
    if len(stream) < 2:
        raise DataError(f"the text gives {len(stream)} token(s); need at least 2")
    if len(stream) < seq_len:
        return torch.tensor([stream], dtype=torch.long)
    n = max(1, min(len(stream) // seq_len, max_tokens // seq_len))
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def stdlib_val_docs() -> list[str]:
    """The validation documents of the stdlib corpus (the split ``quantize`` evaluates on)."""
    from outlierlab.data import DataConfig, collect, split_documents

    docs = collect("stdlib").documents
    return [d.text for d in split_documents(docs, DataConfig.val_fraction)[1]]


def _run_windows(run: RunFolder, seq_len: int, max_tokens: int):
    """Validation windows of an outlierlab run folder (its own data config)."""
    import warnings

    from outlierlab.data import prepare, validation_windows

    data = prepare(run.data_config, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fewer windows than asked: the token count says so
        x, _ = validation_windows(data.val, seq_len, max(1, max_tokens // seq_len))
    return x


def measure(
    loaded: Any,
    x: Any,
    batch_size: int,
    points: list[str] | None = None,
) -> tuple[dict[str, dict], dict[str, float]]:
    """Monitor results of ``loaded`` over the windows ``x`` (exact Eq. 2: all tokens) and the
    attention entropy per layer (over every sequence; empty when the model exposes none)."""
    import torch

    from outlierlab.monitor import OutlierMonitor

    try:
        mon = OutlierMonitor(loaded.model, points=points or "auto", mmr_max_tokens=None,
                             attn_max_tokens=None)  # fmt: skip
    except ConfigError as exc:
        if points:
            raise
        from outlierlab.monitor import block_list_name

        blocks = block_list_name(loaded.model)
        example = f" (e.g. --points '{blocks}.*')" if blocks else ""
        raise ConfigError(
            f"{type(loaded.model).__name__} is not a supported architecture for automatic points; "
            f"pass --points GLOB [GLOB ...] with module names{example}"
        ) from exc
    device = next(iter(loaded.model.parameters())).device
    with mon, torch.no_grad():
        for i in range(0, len(x), batch_size):
            loaded(x[i : i + batch_size].to(device))
    return mon.results(), mon.attention_entropy()


def run(args: argparse.Namespace) -> int:
    path = Path(args.model_dir)

    from outlierlab.loading import load_model

    loaded = load_model(path, device=args.device)
    print(loaded.describe())
    if args.seq_len is None:
        args.seq_len = min(DEFAULT_SEQ_LEN, loaded.seq_len or DEFAULT_SEQ_LEN)
    elif loaded.seq_len is not None and args.seq_len > loaded.seq_len:
        raise ConfigError(f"--seq-len {args.seq_len} exceeds the model's context {loaded.seq_len}")
    if args.data is not None:
        docs = read_text(Path(args.data))
        x = windows(loaded.tokenizer, docs, args.seq_len, args.max_tokens)
    elif loaded.kind == "outlierlab" and RunFolder(loaded.path).is_run:
        x = _run_windows(RunFolder(loaded.path), args.seq_len, args.max_tokens)
    else:  # HF, GGUF or bare model: the stdlib corpus's validation documents
        x = windows(loaded.tokenizer, stdlib_val_docs(), args.seq_len, args.max_tokens)

    res, entropy = measure(loaded, x, args.batch_size, args.points)
    tokens = max((r["tokens"] for r in res.values()), default=0)
    report = {
        "model": str(path),
        **({"step": loaded.step} if loaded.step is not None else {}),
        "tokens": tokens,
        "points": [
            {
                "name": name,
                "kurtosis": r["kurtosis"],
                "mmr": r["mmr"],
                "cos_sim": r["cos_sim"],
                "kurtosis_authors": r["kurtosis_authors"],
                "corr_authors": r["corr_authors"],
                "outlier_neurons": r["outlier_neurons"],
            }
            for name, r in res.items()
        ],
    }
    if entropy:
        report["attn_entropy"] = entropy
        report["attn_entropy_min"] = min(entropy.values())
    if args.profile:
        from outlierlab.profile import profile

        report["profile"] = profile(loaded.model, x, args.batch_size, args.points or "auto")
    _print(report, tuple(x.shape), args.top, args.authors)
    if args.json:
        write_json(args.json, report)
    return 0


def _print(report: dict, shape: tuple[int, ...], top: int, authors: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    def num(v: float) -> str:
        return "nan" if v is None or v != v else f"{v:.3f}"

    table = Table(
        title=f"{report['model']}: {report['tokens']} tokens ({shape[0]} × {shape[1]})",
        title_justify="left",
    )
    extra = ("kurtosis_authors", "corr_authors") if authors else ()
    table.add_column("point", no_wrap=True)
    for col in ("Kurt", "MMR", "cos-sim", *(("Kurt−1 (a)", "corr (a)") if authors else ())):
        table.add_column(col, justify="right")
    table.add_column("outlier neurons (RMS > 6× median)")
    for p in report["points"]:
        idx = p["outlier_neurons"]
        shown = ", ".join(map(str, idx[:top])) + (
            f", … (+{len(idx) - top})" if len(idx) > top else ""
        )
        cells = [num(p[k]) for k in ("kurtosis", "mmr", "cos_sim", *extra)]
        table.add_row(p["name"], *cells, shown or "-")
    if authors:
        table.caption = "(a): the authors' code (token-centred x; see docs/measure.md)"
        table.caption_justify = "left"
    console = Console(width=max(100, Console().width))
    console.print(table)
    if report.get("attn_entropy"):
        layers = ", ".join(f"{k.removesuffix('.attn')} {num(v)}"
                           for k, v in report["attn_entropy"].items())  # fmt: skip
        console.print(f"attention entropy (nats; uniform causal at this length: "
                      f"{num(_uniform_entropy(shape[1]))}): {layers}; min "
                      f"{num(report['attn_entropy_min'])}", soft_wrap=True)  # fmt: skip
    if "profile" in report:
        from outlierlab.profile import print_profile

        print_profile(report["profile"], console)


def _uniform_entropy(seq_len: int) -> float:
    """Mean over query positions t of log(t + 1): the entropy of uniform causal attention."""
    import math

    return sum(math.log(t + 1) for t in range(seq_len)) / seq_len
