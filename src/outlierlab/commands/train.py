"""``outlierlab train``: train a GPT with the paper's optimisers, logging OF metrics."""

from __future__ import annotations

import argparse
import sys

from outlierlab.fields import preset_names


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a GPT; writes a run folder (config, metrics, checkpoints, weights)",
        description=(
            "Train a GPT from a preset, a TOML file and field=value overrides, e.g. "
            "`outlierlab train --preset tiny model=op optim.name=soap optim.lr=3e-3 "
            "train.steps=2000 out=runs/op-soap`. Exit codes: 0 finished, 2 bad input, "
            "3 diverged, 130 interrupted (resume with --resume RUN_DIR)."
        ),
    )
    p.add_argument("--preset",
                   help=f"training preset ({', '.join(preset_names())}); default: default")
    p.add_argument("--config", metavar="FILE.toml", help="TOML file on top of the preset")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint")
    p.add_argument(
        "--allow-data-change",
        action="store_true",
        help="with --resume: continue although the corpus changed since the run started",
    )
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="field=value",
        help="dotted overrides: model=op, model.n_layer=4, optim.name=soap, optim.lr=3e-3, "
        "optim.eps=1e-6, train.steps=500, train.ckpt_every=100, train.log_every=10, out=DIR",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from outlierlab import config
    from outlierlab.errors import ConfigError
    from outlierlab.train import train

    if args.resume:
        if args.preset or args.config:
            raise ConfigError("--resume uses the run's own config; give only field=value overrides")
        cfg = config.resume_config(args.resume, args.overrides)
    else:
        cfg = config.load(args.preset, args.config, args.overrides)
    if args.allow_data_change and not args.resume:
        raise ConfigError("--allow-data-change only applies with --resume RUN_DIR")
    result = train(cfg, resume=bool(args.resume), progress=not args.quiet,
                   allow_data_change=args.allow_data_change)
    if result.status != "finished":
        print(f"outlierlab train: {result.status}: {result.message}", file=sys.stderr)
    return result.exit_code
