"""``outlierlab`` command line: one sub-command per module in :mod:`outlierlab.commands`.

Each command module defines ``add_parser(subparsers)`` (registering its arguments and setting
``func``) and keeps heavy imports inside its run function, so ``outlierlab --help`` is fast.
Any :class:`~outlierlab.errors.OutlierlabError` becomes a one-line message and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from outlierlab.errors import OutlierlabError

# name -> module under outlierlab.commands; the order is the order of `outlierlab --help`.
COMMANDS: dict[str, str] = {
    "measure": "measure",
    "data": "data",
    "train": "train",
    "runs": "runs",
    "quantize": "quantize",
    "price": "price",
    "sweep": "sweep",
    "report": "report",
    "reproduce": "reproduce",
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="outlierlab", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(f"outlierlab.commands.{module}")
        except ModuleNotFoundError as exc:
            if exc.name == f"outlierlab.commands.{module}":
                continue  # command not built yet
            raise
        mod.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `field=value` overrides may stand on either side of options (argparse stops a positional
    # list at the first option); anything else left over is an error as usual.
    overrides = getattr(args, "overrides", None)
    if extra and isinstance(overrides, list) and all("=" in t and t[0] != "-" for t in extra):
        overrides.extend(extra)
        extra = []
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OutlierlabError as exc:
        print(f"outlierlab {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"outlierlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
