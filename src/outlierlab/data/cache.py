"""The token cache: one folder per (corpus fingerprint, tokenizer) holding ``train.bin`` and
``val.bin`` (raw little-endian token ids), ``meta.json`` and, for BPE, ``tokenizer.json``.

Ids are stored as uint16 when every id fits (``vocab_size <= 65536``) and uint32 otherwise;
the byte tokenizer needs 257 symbols, so it is uint16 too (uint8 cannot hold ``<|endoftext|>``).
Files are written to a temporary name and moved into place with ``os.replace``; ``meta.json``
is written last, so a folder with a ``meta.json`` is complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from outlierlab.errors import DataError

META_FILE = "meta.json"
CACHE_FORMAT = 1


def cache_key(fingerprint: dict) -> str:
    """The cache folder name: sha256 of the canonical JSON of ``fingerprint`` (16 hex digits)."""
    blob = json.dumps(fingerprint, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id ``< vocab_size`` fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def read_meta(folder: Path) -> dict | None:
    """``meta.json`` of a complete cache folder, or ``None`` (missing or unreadable)."""
    try:
        return json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class TokenWriter:
    """Append token arrays to ``path`` (through a temporary file); ``commit()`` moves it in."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = dtype
        self.n_tokens = 0
        self._tmp = tmp_name(path)
        self._fh = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit/abort

    def write(self, ids: np.ndarray) -> None:
        self._fh.write(np.ascontiguousarray(ids, dtype=self.dtype).tobytes())
        self.n_tokens += len(ids)

    def commit(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            self._tmp.unlink()


def open_tokens(path: Path, dtype: np.dtype | str, n_tokens: int) -> np.ndarray:
    """The token file as a read-only ``np.memmap`` of ``n_tokens`` ids."""
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=(n_tokens,))


def file_matches(path: Path, dtype: np.dtype | str, n_tokens: int) -> bool:
    try:
        return path.stat().st_size == n_tokens * np.dtype(dtype).itemsize
    except OSError:
        return False


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``folder.lock`` so concurrent processes (e.g. DDP ranks on one
    machine) build a cache folder once; the others wait, then reuse it. No-op without fcntl.
    ``DataError`` naming the folder when it cannot be written (a file in the way, read-only)."""
    lock = folder.with_name(folder.name + ".lock")
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fh = open(lock, "w")  # noqa: SIM115 (closed below; opened here to catch its OSError)
    except OSError as exc:
        raise DataError(
            f"token cache {folder.parent}: cannot write {exc.filename} ({exc.strerror}); set "
            "data.cache_dir or $OUTLIERLAB_CACHE to a writable folder"
        ) from exc
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        fh.close()
        yield
        return
    with fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
