"""``outlierlab`` command line: one sub-command per module in :mod:`outlierlab.commands`.

Each command module defines ``add_parser(subparsers)`` (registering its arguments and setting
``func``) and keeps heavy imports inside its run function, so ``outlierlab --help`` is fast.
Exit codes (:data:`~outlierlab.errors.EXIT_CODES`): an
:class:`~outlierlab.errors.OutlierlabError`, a usage error or a path that cannot be used (an
``OSError`` naming a file: permission, read-only, a file where a folder should be, …) is one
line on stderr and exit 2. Output paths given as options
are checked before any work starts (:func:`output_file`, :func:`output_dir`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

from outlierlab.errors import (
    EXIT_CODES,
    ConfigError,
    OutlierlabError,
    path_error,
    path_reason,
)
from outlierlab.safe_io import NOFOLLOW, is_no_space

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


_SAID = {"finished": "success", "crashed": "unexpected failure", "diverged": "training diverged"}
DESCRIPTION = (
    "Measure, avoid and price outlier features in transformers (He et al., NeurIPS 2024). "
    "Exit codes: " + ", ".join(f"{code} {_SAID.get(what, what)}" for what, code in
                               sorted(EXIT_CODES.items(), key=lambda kv: kv[1])) + "."
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
    probe = p / f".outlierlab-probe-{os.getpid()}"
    try:  # root passes os.access everywhere: /proc, a read-only mount; try for real
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW, 0o600))
    except OSError as exc:
        return f"{p} is not writable ({path_reason(exc) or exc.strerror})"
    probe.unlink()
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


_DEVICE = re.compile(r"cpu|mps|cuda(:\d+)?")


def device(spec: str) -> str:
    """argparse ``type=`` for ``--device``: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, and one
    this machine has (so a bad device is not blamed on the weights later)."""
    if not _DEVICE.fullmatch(spec):
        raise argparse.ArgumentTypeError(
            f"{spec!r} is not a device; allowed: cpu, cuda, cuda:N (N = 0, 1, ...), mps")
    if spec == "cpu":
        return spec
    import torch

    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError("'mps' is not available on this machine; "
                                             "allowed: cpu")
        return spec
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if int(spec.partition(":")[2] or 0) >= n:
        have = f"cpu, cuda:0..cuda:{n - 1}" if n else "cpu (no CUDA device on this machine)"
        raise argparse.ArgumentTypeError(f"{spec!r} is not on this machine; allowed: {have}")
    return spec


# -- the command line -------------------------------------------------------------------------

class _RaisingParser(_Parser):
    """A parser whose usage errors raise :class:`ConfigError` instead of exiting."""

    where = ""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.where}: {message}")


def parse_args_of(command: str, argv: Sequence[str], where: str) -> argparse.Namespace:
    """Parse ``argv`` as ``outlierlab COMMAND``'s arguments without running it (a grid's
    ``quant.args``); a usage error is a :class:`ConfigError` starting with ``where``."""
    parser = _RaisingParser(prog=f"outlierlab {command}")
    _RaisingParser.where = where
    sub = parser.add_subparsers(dest="command", parser_class=_RaisingParser)
    importlib.import_module(f"outlierlab.commands.{COMMANDS[command]}").add_parser(sub)
    return parser.parse_args([command, *argv])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="outlierlab", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS.values():
        importlib.import_module(f"outlierlab.commands.{module}").add_parser(sub)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="show other libraries' warnings and tracebacks")
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
        with quiet_libraries(getattr(args, "verbose", False)), _printable_names():
            return int(args.func(args) or 0)
    except OutlierlabError as exc:
        return _error(args.command, str(exc))
    except OSError as exc:
        message = path_error(exc) or (f"cannot write: {exc.strerror.lower()}"
                                      if is_no_space(exc) and exc.strerror else None)
        if message is None:
            raise
        return _error(args.command, message)
    except KeyboardInterrupt:
        print(f"outlierlab {args.command}: interrupted", file=sys.stderr)
        return EXIT_CODES["interrupted"]


def _error(command: str, message: str) -> int:
    """Print ``outlierlab COMMAND: error: MESSAGE`` (one line) on stderr; the exit code 2."""
    print(f"outlierlab {command}: error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_CODES["bad input"]


@contextlib.contextmanager
def _printable_names() -> Iterator[None]:
    """stdout prints a file name that is not UTF-8 (``\\udcff``) instead of failing."""
    old = getattr(sys.stdout, "errors", None)
    try:
        sys.stdout.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    except (AttributeError, ValueError):
        old = None
    try:
        yield
    finally:
        if old is not None:
            with contextlib.suppress(AttributeError, ValueError):
                sys.stdout.reconfigure(errors=old)  # type: ignore[union-attr]


@contextlib.contextmanager
def quiet_libraries(verbose: bool) -> Iterator[None]:
    """Unless ``verbose``: no Python warnings and no transformers/HF hub log lines (loading
    reports, deprecation notes) before our own one-line messages."""
    if verbose:
        yield
        return
    import logging

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    names = ("transformers", "huggingface_hub", "accelerate", "torch", "safetensors")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    if "transformers" in sys.modules:
        with contextlib.suppress(Exception):
            sys.modules["transformers"].utils.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(max(lg.level, logging.ERROR))
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
