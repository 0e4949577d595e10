"""Typed errors. Every user-facing mistake raises a subclass of :class:`OutlierlabError`
with a one-line message naming what is wrong and what is allowed; the CLI prints it and
exits with status 2 (:data:`EXIT_CODES`)."""

from __future__ import annotations

import errno
from pathlib import Path

EXIT_CODES: dict[str, int] = {
    "finished": 0,  # success (a training run: status ``finished``)
    "crashed": 1,  # an unexpected failure: a bug, with its traceback
    "bad input": 2,  # an OutlierlabError, a usage error or a path that cannot be used
    "diverged": 3,  # training diverged (non-finite loss or gradient norm)
    "interrupted": 130,  # SIGINT/SIGTERM (128 + SIGINT, as shells report it)
}
"""The process exit code of each outcome: the CLI's one-line errors, and a training run's
final status (``TrainResult.exit_code``); a ``status.json`` status is a key here."""


class OutlierlabError(Exception):
    """Base of every error outlierlab raises on purpose."""


class ConfigError(OutlierlabError, ValueError):
    """An invalid config field, preset, override or combination of options."""


class DataError(OutlierlabError, ValueError):
    """Missing, empty or malformed data, corpus or tokenizer."""


class ModelLoadError(OutlierlabError, ValueError):
    """A model folder or checkpoint that is missing, tampered with or unsupported."""


class CheckpointError(OutlierlabError):
    """A checkpoint that cannot be written, read or resumed from."""


class RunFolderError(OutlierlabError):
    """A run folder whose files cannot be read (malformed JSON, wrong types, bad bytes)."""


class RunInUseError(RunFolderError):
    """A run folder locked by another live process (train, resume, quantize --save)."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty): what
    a one-line error or a status message quotes of an error from another library."""
    if isinstance(exc, OSError) and (message := path_error(exc)):
        return message  # not "[Errno 17] File exists: ..."
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# -- OSErrors about a path the user gave ------------------------------------------------------

_PATH_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted (immutable?)",
    errno.EROFS: "read-only file system",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EEXIST: "already exists",
    errno.ENOENT: "no such file or folder",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENAMETOOLONG: "name too long",
    errno.ELOOP: "too many levels of symbolic links",
}


def path_reason(exc: OSError) -> str | None:
    """Why an ``OSError`` about a path the user gave (or one under it) happened, in words, or
    None for any other ``OSError`` (a bug: let its traceback show)."""
    if exc.filename is None or exc.errno not in _PATH_ERRNOS:
        return None
    why = _PATH_ERRNOS[exc.errno]
    if exc.errno == errno.ENOTDIR:  # name the file that stands where a folder should be
        blocker = next((p for p in Path(exc.filename).parents if p.is_file()), None)
        why = f"{blocker} is a file, not a folder" if blocker else why
    elif exc.errno == errno.ELOOP and Path(exc.filename).is_symlink() and Path(
            exc.filename).exists():  # O_NOFOLLOW refused a link to a real file
        why = "is a symbolic link; outlierlab never writes through links: remove it"
    elif exc.errno == errno.EEXIST and Path(exc.filename).is_symlink() and not Path(
            exc.filename).exists():  # mkdir on a link that leads nowhere
        why = "a symbolic link that leads nowhere (a loop, or its target is missing)"
    elif exc.errno == errno.EEXIST and Path(exc.filename).is_file():  # mkdir on a file
        why = f"{exc.filename} is a file, not a folder"
    return why


def path_error(exc: OSError) -> str | None:
    """One line for an ``OSError`` about a path the user gave: ``cannot use PATH: why``; None
    for any other ``OSError``."""
    why = path_reason(exc)
    if why is None:
        return None
    names = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f is not None)
    return f"cannot use {names}: {why}"
