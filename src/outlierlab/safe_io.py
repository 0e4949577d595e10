"""Writing files that are ours, and only ours (docs/reliability.md).

Every file outlierlab writes goes through here: a temporary sibling created with ``O_EXCL |
O_NOFOLLOW`` (never through a symlink an attacker or a careless user left), filled, then
``os.replace``-d over the target (which replaces a symlink, never writes through it). Whatever
fails on the way (ENOSPC, EIO, a kill of the library writing) removes the temporary file, so a
full disk leaves the old file or the new one, never half of one and no debris. An ``OSError``
without a file name (``pwrite``, PIL) is given the target's name, so the CLI can say which path
could not be written.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_NO_SPACE_WORDS = ("no space left", "storagefull", "disk quota", "file write failed")


def tmp_name(path: Path) -> Path:
    """The temporary sibling of ``path`` this process writes first."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_no_space(exc: BaseException) -> bool:
    """An error that means the disk (or quota) is full, whichever library raised it."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc).lower()
    return any(w in text for w in _NO_SPACE_WORDS)


def as_os_error(exc: BaseException, path: Path) -> BaseException:
    """``exc`` as an ``OSError`` naming ``path`` when it is a file-system error without a name
    (or a full disk reported by another library); else ``exc`` unchanged."""
    if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
        return OSError(exc.errno, os.strerror(exc.errno), str(path))
    if not isinstance(exc, OSError) and is_no_space(exc):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return exc


def remove(path: Path) -> None:
    """Remove a file or folder we made (a link itself, never its target); no error if gone."""
    with contextlib.suppress(OSError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()


@contextlib.contextmanager
def replacing(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``path`` for a writer (a library's ``save``); on
    success it replaces ``path``, on any error it is removed and the error re-raised (an
    ``OSError`` naming ``path``). ``folder=True``: the temporary path is an empty folder."""
    path = Path(path)
    tmp = tmp_name(path)
    remove(tmp)  # a stale one of a dead process with our pid
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        if not folder and not tmp.is_file():
            raise OSError(errno.EIO, "nothing was written", str(path))
        os.replace(tmp, path)
    except BaseException as exc:
        remove(tmp)
        if isinstance(exc, OSError) and exc.filename is not None and Path(exc.filename) == tmp:
            exc.filename = None  # name the file the user asked for, not our temporary one
        new = as_os_error(exc, path)
        if new is exc:
            raise
        raise new from exc


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically through an ``O_EXCL | O_NOFOLLOW`` temporary file."""
    path = Path(path)
    with replacing(path) as tmp:
        fd = os.open(tmp, NEW_FILE, 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_bytes` of UTF-8 text (names that are not UTF-8 are kept as bytes)."""
    return write_bytes(path, text.encode("utf-8", "surrogateescape"))


def printable(text: str) -> str:
    """``text`` with the undecodable bytes of a file name (surrogates) shown as U+FFFD."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def open_append(path: str | os.PathLike):
    """A text file opened for appending, never through a symlink (``ELOOP`` → ``OSError``)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | NOFOLLOW, 0o644)
    return os.fdopen(fd, "a", buffering=1, encoding="utf-8")


def save_figure(fig, path: str | os.PathLike, **kwargs) -> Path:
    """``fig.savefig`` atomically: a full disk leaves no 0-byte image."""
    path = Path(path)
    fmt = kwargs.pop("format", path.suffix.lstrip(".") or "png")
    with replacing(path) as tmp:
        fig.savefig(tmp, format=fmt, **kwargs)
    return path


@contextlib.contextmanager
def pinned(path: str | os.PathLike) -> Iterator[str]:
    """A name for ``path`` that libraries taking a UTF-8 ``str`` can open, pinned to the file
    as it is now: on Linux ``/proc/self/fd/N`` of an open descriptor, so a file renamed or
    deleted meanwhile (a checkpoint rotated away by a training run) is still read whole, and a
    name that is not UTF-8 still opens. Elsewhere the path itself."""
    if not Path("/proc/self/fd").is_dir():
        yield str(path)
        return
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)

