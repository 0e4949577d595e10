"""``prepare(cfg)``: corpus → split → tokenizer → token cache → :class:`PreparedData`.

The first call tokenises the corpus into the cache (with a progress bar); later calls with the
same corpus and tokenizer find the cache folder by fingerprint and only memory-map it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from outlierlab.data import cache
from outlierlab.data.config import DataConfig
from outlierlab.data.corpus import Corpus, Document, collect, split_documents
from outlierlab.data.tokenizer import (
    TOKENIZER_FILE,
    ByteTokenizer,
    Tokenizer,
    describe,
    load_tokenizer_file,
    tokenizer_id,
    train_bpe,
)
from outlierlab.errors import DataError
from outlierlab.jsonable import write_json

ENCODE_CHUNK = 64  # documents per encode_batch call


@dataclass
class PreparedData:
    """Token arrays of both splits (read-only memmaps) and everything needed to reproduce them."""

    train: np.ndarray
    val: np.ndarray
    tokenizer: Tokenizer
    fingerprint: dict
    """JSON-able: source, Python version, file count, byte counts, file-list hash, tokenizer id."""
    path: Path
    """The cache folder (``<cache>/tokens/<key>``)."""
    built: bool
    """True when this call tokenised the corpus; False when it reused the cache."""
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Short hash of :attr:`fingerprint` (the cache folder name)."""
        return self.path.name

    def summary(self) -> dict:
        """One flat JSON-able dict for logs and the CLI."""
        fp = self.fingerprint
        return {
            "source": fp["source"],
            "files": fp["files"],
            "train_files": fp["train_files"],
            "val_files": fp["val_files"],
            "bytes": fp["bytes"],
            "skipped_non_utf8": self.meta.get("skipped_non_utf8", 0),
            "duplicates": self.meta.get("duplicates", 0),
            "train_tokens": len(self.train),
            "val_tokens": len(self.val),
            "tokenizer": self.tokenizer.name,
            "vocab_size": self.tokenizer.vocab_size,
            "dtype": str(self.train.dtype),
            "fingerprint": self.key,
            "cache": str(self.path),
            "built": self.built,
            "build_seconds": self.meta.get("build_seconds"),
        }


def _docs_hash(docs: Iterable[Document]) -> str:
    """sha256 over the sorted (name, sha256(text)) pairs."""
    h = hashlib.sha256()
    for d in sorted(docs, key=lambda d: d.name):
        h.update(d.name.encode("utf-8", "surrogateescape") + b"\0" + d.digest)
    return h.hexdigest()


def _nbytes(docs: Iterable[Document]) -> int:
    return sum(d.n_bytes for d in docs)


def fingerprint(
    cfg: DataConfig, corpus: Corpus, train: list[Document], val: list[Document]
) -> dict:
    """What identifies a token cache: the documents (names + content hashes), their split,
    the Python version, and the tokenizer."""
    train_bytes, val_bytes = _nbytes(train), _nbytes(val)
    return {
        "format": cache.CACHE_FORMAT,
        "source": corpus.source,
        "kind": corpus.kind,
        "python": platform.python_version(),
        "files": len(corpus.documents),
        "bytes": train_bytes + val_bytes,
        "files_hash": _docs_hash(corpus.documents),
        "train_files": len(train),
        "val_files": len(val),
        "train_bytes": train_bytes,
        "val_bytes": val_bytes,
        "val_fraction": cfg.val_fraction,
        "include_tests": cfg.include_tests if corpus.kind == "stdlib" else None,
        "tokenizer": tokenizer_id(cfg.tokenizer, cfg.vocab_size),
    }


def _progress(enabled: bool):
    """A rich progress bar on stderr (disabled when not a terminal or not wanted)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    console = Console(stderr=True)
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )


def _get_tokenizer(cfg: DataConfig, folder: Path, train: list[Document], progress) -> Tokenizer:
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer == "bpe":
        path = folder / TOKENIZER_FILE
        name = f"bpe-{cfg.vocab_size}"
        if path.is_file():
            try:
                tok = load_tokenizer_file(path)
            except DataError:  # a damaged cache file: train again
                pass
            else:
                tok.name = name
                return tok
        (folder / cache.META_FILE).unlink(missing_ok=True)  # tokens of an older BPE are stale
        task = progress.add_task(f"training BPE (vocab {cfg.vocab_size})", total=None)
        tok = train_bpe((d.text for d in train), cfg.vocab_size, length=len(train))
        progress.remove_task(task)
        folder.mkdir(parents=True, exist_ok=True)
        tok.save(folder)
        return tok
    tok = load_tokenizer_file(cfg.tokenizer)
    tok.save(folder)  # a copy next to the tokens it produced
    return tok


def _encode_split(
    tok: Tokenizer, docs: list[Document], writer: cache.TokenWriter, progress, label: str
) -> None:
    """Encode ``docs`` (each followed by ``eot``) into ``writer``, in chunks of documents."""
    eot = np.array([tok.eot_id], dtype=writer.dtype)
    task = progress.add_task(f"tokenising {label}", total=_nbytes(docs))
    for i in range(0, len(docs), ENCODE_CHUNK):
        chunk = docs[i : i + ENCODE_CHUNK]
        for ids in tok.encode_batch([d.text for d in chunk]):
            writer.write(ids)
            writer.write(eot)
        progress.advance(task, _nbytes(chunk))
    progress.remove_task(task)


def _load(folder: Path, fp: dict, tok: Tokenizer, built: bool) -> PreparedData | None:
    meta = cache.read_meta(folder)
    if meta is None or meta.get("fingerprint") != fp:
        return None
    dtype = meta["dtype"]
    if not all(
        cache.file_matches(folder / f"{s}.bin", dtype, meta[f"{s}_tokens"])
        for s in ("train", "val")
    ):
        return None
    train = cache.open_tokens(folder / "train.bin", dtype, meta["train_tokens"])
    val = cache.open_tokens(folder / "val.bin", dtype, meta["val_tokens"])
    return PreparedData(train, val, tok, fp, folder, built, meta)


def _trained_twin(
    cfg: DataConfig, corpus: Corpus, train: list[Document], val: list[Document]
) -> PreparedData | None:
    """The cache built by ``tokenizer="bpe"`` on this corpus when the user's tokenizer.json is
    exactly the BPE trained there (e.g. a run folder's copy): reuse it instead of re-encoding."""
    user = load_tokenizer_file(cfg.tokenizer)
    if user.vocab_size < 258:
        return None
    bpe_cfg = dataclasses.replace(cfg, tokenizer="bpe", vocab_size=user.vocab_size)
    fp = fingerprint(bpe_cfg, corpus, train, val)
    folder = cfg.cache_root() / "tokens" / cache.cache_key(fp)
    try:
        same = (folder / TOKENIZER_FILE).read_text(encoding="utf-8") == user.to_json()
    except OSError:
        return None
    return _load(folder, fp, user, built=False) if same else None


def prepare(cfg: DataConfig | None = None, *, progress: bool = True) -> PreparedData:
    """Collect, split, tokenise and cache the corpus of ``cfg``; reuse the cache when present.

    Concurrent callers (e.g. DDP ranks on one machine) are serialised by a file lock, so the
    folder is built once. ``progress`` shows a bar on stderr when it is a terminal.
    """
    cfg = cfg or DataConfig()
    corpus = collect(cfg.source, include_tests=cfg.include_tests, text_field=cfg.text_field)
    train_docs, val_docs = split_documents(corpus.documents, cfg.val_fraction)
    fp = fingerprint(cfg, corpus, train_docs, val_docs)
    folder = cfg.cache_root() / "tokens" / cache.cache_key(fp)

    if cfg.tokenizer not in ("bytes", "bpe"):
        twin = _trained_twin(cfg, corpus, train_docs, val_docs)
        if twin is not None:
            return twin

    with cache.build_lock(folder), _progress(progress) as bar:
        start = time.perf_counter()
        tok = _get_tokenizer(cfg, folder, train_docs, bar)
        found = _load(folder, fp, tok, built=False)
        if found is not None:
            return found
        if tok.vocab_size > 2**32:
            raise DataError(f"vocab_size {tok.vocab_size} does not fit uint32 token ids")
        folder.mkdir(parents=True, exist_ok=True)
        dtype = cache.token_dtype(tok.vocab_size)
        counts = {}
        for split, docs in (("train", train_docs), ("val", val_docs)):
            writer = cache.TokenWriter(folder / f"{split}.bin", dtype)
            try:
                _encode_split(tok, docs, writer, bar, split)
            except BaseException:
                writer.abort()
                raise
            writer.commit()
            counts[split] = writer.n_tokens
        meta = {
            "fingerprint": fp,
            "dtype": dtype.str,
            "train_tokens": counts["train"],
            "val_tokens": counts["val"],
            "tokenizer": describe(tok),
            "skipped_non_utf8": len(corpus.skipped_non_utf8),
            "skipped_files": corpus.skipped_non_utf8[:50],
            "duplicates": corpus.duplicates,
            "empty": corpus.empty,
            "build_seconds": round(time.perf_counter() - start, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "python_executable": sys.executable,
        }
        write_json(folder / cache.META_FILE, meta)
    loaded = _load(folder, fp, tok, built=True)
    assert loaded is not None, "cache folder just written does not load"
    return loaded


__all__ = ["PreparedData", "fingerprint", "prepare"]
