"""Collecting documents: the interpreter's standard library, files, folders, globs, JSONL and
local Hugging Face ``datasets`` folders; deduplication and the stable train/validation split.

The split is by document: a document goes to validation when the first 8 bytes of
sha1(name), read as a fraction of 2**64, fall below ``val_fraction``; so a file is never in
both splits and its side does not depend on which other files exist.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

from outlierlab.errors import DataError

# Folder names that hold the standard library's own tests (excluded unless include_tests).
STDLIB_TEST_DIRS = frozenset({"test", "tests", "idle_test"})
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
DATASETS_MARKERS = ("dataset_dict.json", "dataset_info.json", "state.json")
GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Document:
    """One document: a stable name (relative path, ``file.jsonl:LINE`` ...) and its text."""

    name: str
    text: str
    n_bytes: int = field(init=False, repr=False, compare=False)
    """Length of the UTF-8 encoding."""
    digest: bytes = field(init=False, repr=False, compare=False)
    """sha256 of the UTF-8 encoding."""

    def __post_init__(self) -> None:
        data = self.text.encode("utf-8")
        object.__setattr__(self, "n_bytes", len(data))
        object.__setattr__(self, "digest", hashlib.sha256(data).digest())


@dataclass
class Corpus:
    """Deduplicated documents in a stable order, and what was dropped on the way."""

    kind: str
    """``stdlib``, ``file``, ``folder``, ``glob``, ``jsonl`` or ``datasets``."""
    source: str
    documents: list[Document]
    skipped_non_utf8: list[str] = field(default_factory=list)
    duplicates: int = 0
    empty: int = 0

    @property
    def n_bytes(self) -> int:
        return sum(d.n_bytes for d in self.documents)


def _unit_hash(name: str) -> float:
    """A stable number in [0, 1) from a document name (sha1, first 8 bytes)."""
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).digest()  # any file name
    return int.from_bytes(digest[:8], "big") / 2**64


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_text(path: Path, strict: bool) -> str | None:
    """UTF-8 text of ``path``; ``None`` when it does not decode and ``strict`` is false."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if strict:
            raise DataError(
                f"{path} is not UTF-8 text (byte {exc.start}); pass a text file"
            ) from None
        return None


def _from_paths(kind: str, source: str, root: Path, paths: list[Path]) -> Corpus:
    corpus = Corpus(kind=kind, source=source, documents=[])
    for p in sorted(paths):
        text = _read_text(p, strict=False)
        name = p.relative_to(root).as_posix()
        if text is None:
            corpus.skipped_non_utf8.append(name)
        else:
            corpus.documents.append(Document(name, text))
    return corpus


def _walk(root: Path, skip_dirs: frozenset[str], suffix: str = "") -> list[Path]:
    """Files under ``root`` (``os.walk``, pruning ``skip_dirs`` and hidden entries)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        out += [
            Path(dirpath, f) for f in filenames if f.endswith(suffix) and not f.startswith(".")
        ]
    return [p for p in out if p.is_file()]


def _stdlib(include_tests: bool) -> Corpus:
    skip = STDLIB_SKIP_DIRS if include_tests else STDLIB_SKIP_DIRS | STDLIB_TEST_DIRS
    py = ".".join(map(str, sys.version_info[:3]))
    root = stdlib_root()
    return _from_paths("stdlib", f"stdlib (Python {py})", root, _walk(root, skip, ".py"))


def _folder(root: Path) -> Corpus:
    return _from_paths("folder", str(root), root, _walk(root, frozenset()))


def _glob_source(pattern: str) -> Corpus:
    paths = [Path(p) for p in _glob.glob(str(Path(pattern).expanduser()), recursive=True)]
    paths = [p.resolve() for p in paths if p.is_file()]
    if not paths:
        raise DataError(f"glob {pattern} matches no files")
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return _from_paths("glob", pattern, root, paths)


def _jsonl(path: Path, text_field: str) -> Corpus:
    corpus = Corpus(kind="jsonl", source=str(path), documents=[])
    text = _read_text(path, strict=True)
    assert text is not None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno} is not valid JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or text_field not in obj:
            raise DataError(f"{path}:{lineno} has no {text_field!r} field (set data.text_field)")
        value = obj[text_field]
        if not isinstance(value, str):
            raise DataError(
                f"{path}:{lineno} field {text_field!r} is {type(value).__name__}, not text"
            )
        corpus.documents.append(Document(f"{path.name}:{lineno}", value))
    return corpus


def _is_datasets_folder(path: Path) -> bool:
    return any((path / m).is_file() for m in DATASETS_MARKERS)


def _datasets(path: Path, text_field: str) -> Corpus:
    try:
        import datasets  # optional extra
    except ImportError:
        raise DataError(
            f"{path} is a Hugging Face datasets folder; reading it needs the `datasets` extra: "
            "pip install 'outlierlab[datasets]'"
        ) from None
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load datasets folder {path}: {exc}") from None
    splits = ds.items() if isinstance(ds, datasets.DatasetDict) else [("data", ds)]
    corpus = Corpus(kind="datasets", source=str(path), documents=[])
    for split, part in splits:
        if text_field not in part.column_names:
            raise DataError(
                f"datasets folder {path} split {split!r} has no {text_field!r} column "
                f"(columns: {part.column_names}); set data.text_field"
            )
        for i, text in enumerate(part[text_field]):
            if not isinstance(text, str):
                raise DataError(f"{path} {split}[{i}] field {text_field!r} is not text")
            corpus.documents.append(Document(f"{split}/{i}", text))
    return corpus


def _dedupe(corpus: Corpus) -> Corpus:
    """Drop empty documents and exact duplicates (by sha256 of the text; first name wins)."""
    seen: set[bytes] = set()
    kept: list[Document] = []
    for doc in sorted(corpus.documents, key=lambda d: d.name):
        if not doc.text:
            corpus.empty += 1
            continue
        if doc.digest in seen:
            corpus.duplicates += 1
            continue
        seen.add(doc.digest)
        kept.append(doc)
    corpus.documents = kept
    return corpus


def collect(source: str, *, include_tests: bool = False, text_field: str = "text") -> Corpus:
    """Read every document of ``source`` (see :class:`~outlierlab.data.DataConfig`), deduplicated,
    ordered by name. Undecodable files inside a folder/glob/stdlib are skipped and counted; a
    single unreadable file, a bad JSONL line or an empty corpus raises :class:`DataError`."""
    if source == "stdlib":
        corpus = _stdlib(include_tests)
    else:
        path = Path(source).expanduser()
        if path.exists():
            path = path.resolve()  # one cache key however the path is spelled
        if path.is_dir():
            corpus = _datasets(path, text_field) if _is_datasets_folder(path) else _folder(path)
        elif path.is_file():
            if path.suffix == ".jsonl":
                corpus = _jsonl(path, text_field)
            else:
                text = _read_text(path, strict=True)
                corpus = Corpus("file", str(path), [Document(path.name, text or "")])
        elif GLOB_CHARS & set(source):
            corpus = _glob_source(source)
        else:
            raise DataError(
                f"data source {source} does not exist; use 'stdlib', a file, a folder, a glob "
                "or a .jsonl"
            )
    corpus = _dedupe(corpus)
    if not corpus.documents:
        skipped = corpus.skipped_non_utf8
        why = (f" ({len(skipped)} file(s) are not UTF-8, e.g. {skipped[0]}: Latin-1 or binary?)"
               if skipped else "")
        raise DataError(f"data source {source} holds no non-empty UTF-8 documents{why}; "
                        "allowed: UTF-8 text files")
    return corpus


def split_documents(
    docs: list[Document], val_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Stable train/validation split by document (see the module docstring), each side ordered
    by the same hash (so documents from any folder follow each other; the first validation
    windows still cover only the first few documents: :func:`~outlierlab.data.document_windows`
    draws windows across many).

    At least one document goes to each side when there are two or more (the one with the
    smallest hash to validation, the largest to train). A single document is cut at the line
    boundary nearest to ``1 - val_fraction`` of its length (the only split that is possible).
    """
    if len(docs) == 1:
        return _split_one(docs[0], val_fraction)
    ranked = sorted(docs, key=lambda d: (_unit_hash(d.name), d.name))
    n_val = sum(_unit_hash(d.name) < val_fraction for d in ranked)
    n_val = min(max(n_val, 1), len(ranked) - 1)
    return ranked[n_val:], ranked[:n_val]


def _split_one(doc: Document, val_fraction: float) -> tuple[list[Document], list[Document]]:
    text = doc.text
    target = round(len(text) * (1 - val_fraction))
    cut = text.rfind("\n", 0, target) + 1  # start of the line that holds ``target``
    if cut <= 0 or cut >= len(text):
        cut = target
    if cut <= 0 or cut >= len(text):
        raise DataError(f"{doc.name} is too short to split into train and validation")
    return [Document(doc.name + "#train", text[:cut])], [Document(doc.name + "#val", text[cut:])]
