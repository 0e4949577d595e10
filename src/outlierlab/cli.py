"""``outlierlab`` command line: one sub-command per module in :mod:`outlierlab.commands`.

Each command module defines ``add_parser(subparsers)`` (registering its arguments and setting
``func``) and keeps heavy imports inside its run function, so ``outlierlab --help`` is fast.
Exit codes (:data:`EXIT_CODES`): an :class:`~outlierlab.errors.OutlierlabError`, a usage error
or a path that cannot be used (an ``OSError`` naming a file: permission, read-only, a file
where a folder should be, …) is one line on stderr and exit 2. Output paths given as options
are checked before any work starts (:func:`output_file`, :func:`output_dir`).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from outlierlab.errors import OutlierlabError, path_error

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

EXIT_CODES = {0: "success", 2: "bad input", 3: "training diverged", 130: "interrupted"}

DESCRIPTION = (
    "Measure, avoid and price outlier features in transformers (He et al., NeurIPS 2024). "
    "Exit codes: " + ", ".join(f"{code} {what}" for code, what in EXIT_CODES.items()) + "."
)

_RST_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def plain_text(text: str) -> str:
    """Help text without reST markup (a role such as ``:mod:`x``` → x, ``~a.b`` → b; backticks
    dropped) and with its lines joined, so argparse can wrap it."""
    text = _RST_ROLE.sub(lambda m: m[2].rsplit(".", 1)[-1] if m[1] else m[2], text)
    return " ".join(text.replace("`", "").split())


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit code 2 and shows descriptions
    as plain text."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("description"):
            kwargs["description"] = plain_text(kwargs["description"])
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


# -- output paths, checked when the arguments are parsed ---------------------------------------


def _unusable_folder(folder: Path) -> str | None:
    """Why files cannot be created under ``folder`` (which may not exist yet), or None."""
    p = folder
    while not p.exists():
        if p.is_symlink():
            return f"{p} is a broken link"
        p = p.parent
    if not p.is_dir():
        return f"{p} is a file, not a folder"
    if not os.access(p, os.W_OK | os.X_OK):
        return f"{p} is not writable (permission, read-only or immutable)"
    return None


def output_file(path: str) -> str:
    """argparse ``type=`` for a file the command will write: refuse a folder, a path under a
    file and an unwritable place before any work starts."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder; give a file path")
    if p.exists() and not os.access(p, os.W_OK):
        raise argparse.ArgumentTypeError(f"{path}: cannot write to this file")
    why = _unusable_folder(p.parent)
    if why:
        raise argparse.ArgumentTypeError(f"cannot write {path}: {why}")
    return path


def output_dir(path: str) -> str:
    """argparse ``type=`` for a folder the command will create or write into."""
    p = Path(path).expanduser()
    why = _unusable_folder(p)
    if why:
        raise argparse.ArgumentTypeError(f"cannot write into {path}: {why}")
    return path


# -- the command line -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="outlierlab", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS.values():
        importlib.import_module(f"outlierlab.commands.{module}").add_parser(sub)
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
    except OSError as exc:
        message = path_error(exc)
        if message is None:
            raise
        print(f"outlierlab {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"outlierlab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
