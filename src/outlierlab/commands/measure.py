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
from outlierlab.errors import ConfigError
from outlierlab.fields import POSITIVE
from outlierlab.jsonable import write_json
from outlierlab.model_data import DEFAULT_MEASURE_TOKENS, DEFAULT_SEQ_LEN
from outlierlab.run_folder import RunFolder


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "measure",
        help="outlier-feature metrics per layer of a model on text",
        description="Per-layer outlier-feature metrics (Kurt, MMR, cos-sim, outlier neurons) of a "
        "model on text.",
    )
    p.add_argument("model_dir", metavar="MODEL",
                   help="run folder, saved GPT, HF folder or .gguf file")
    p.add_argument(
        "--data",
        metavar="SOURCE",
        help="text to measure on, all of it (a file, folder, glob or .jsonl); default: the "
        "validation windows quantize and price evaluate on (a run's own data, else stdlib)",
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
        default=DEFAULT_MEASURE_TOKENS,
        help=f"measure at most this many tokens (default {DEFAULT_MEASURE_TOKENS})",
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
    p.add_argument(
        "--save",
        action="store_true",
        help="for a run folder: also write RUN/measure.json (with --profile's attention sinks "
        "and max/median, which the mitigations leaderboard reads; implies --profile)",
    )
    p.add_argument("--device", default="cpu", type=device, help="torch device (default cpu)")
    p.set_defaults(func=run)


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

    mon = OutlierMonitor(loaded.model, points=points or "auto", mmr_max_tokens=None,
                         attn_max_tokens=None, attn_entropy=True)  # fmt: skip
    device = next(iter(loaded.model.parameters())).device
    with mon, torch.no_grad():
        for i in range(0, len(x), batch_size):
            loaded(x[i : i + batch_size].to(device))
    return mon.results(), mon.attention_entropy()


def run(args: argparse.Namespace) -> int:
    from outlierlab import model_data
    from outlierlab.loading import load_model
    from outlierlab.structure import check

    path = Path(args.model_dir)
    run_folder = RunFolder(path)
    if args.save and not run_folder.is_run:
        raise ConfigError(f"--save writes RUN/measure.json and needs a run folder; {path} is not "
                          "one (allowed: --json OUT for other models)")  # fmt: skip
    loaded = load_model(path, device=args.device)
    print(loaded.describe())
    print(check(loaded.model, args.points or "auto"))  # a refusal comes now, not after the text
    seq_len = model_data.seq_len_for(loaded, args.seq_len)
    n = max(1, args.max_tokens // seq_len)
    data = model_data.load_data(loaded, args.data, seq_len, n, whole=True)
    data.check_vocab(loaded)
    x, _ = data.windows(n)

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
    if args.profile or args.save:
        from outlierlab.profile import profile

        report["profile"] = profile(loaded.model, x, args.batch_size, args.points or "auto")
    _print(report, tuple(x.shape), args.top, args.authors)
    if args.json:
        write_json(args.json, report)
    if args.save:  # it writes into the run folder: own it meanwhile
        with run_folder.lock("outlierlab measure --save"):
            write_json(run_folder.measure_file, report)
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
