"""``DataConfig``: which corpus, which tokenizer, how to split, where to cache."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from outlierlab.errors import ConfigError
from outlierlab.fields import RESUMABLE, bad, flag, number, setting

TOKENIZER_KINDS = ("bytes", "bpe")


def default_cache_root() -> Path:
    """outlierlab's cache (tokens, tokenizers, GGUF conversions): ``$OUTLIERLAB_CACHE``, else
    ``~/.cache/outlierlab``."""
    env = os.environ.get("OUTLIERLAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "outlierlab"


@dataclass
class DataConfig:
    """The data section of a run config (validated on construction)."""

    source: str = "stdlib"
    """``stdlib`` (this interpreter's standard library .py files), a file, a folder, a glob,
    a ``.jsonl`` (one document per line) or a local Hugging Face ``datasets`` folder."""
    tokenizer: str = "bytes"
    """``bytes`` (vocab 257), ``bpe`` (byte-level BPE trained on the train split) or a path to a
    ``tokenizer.json``."""
    vocab_size: int = 8192
    """Vocabulary size of the trained BPE (ignored for ``bytes`` and user tokenizers)."""
    val_fraction: float = 0.05
    """Share of documents (by a stable hash of their name) held out for validation."""
    include_tests: bool = False
    """For ``stdlib``: also take the test packages (``test/``, ``tests/``, ``idle_test/`` ...)."""
    text_field: str = "text"
    """For ``.jsonl`` and ``datasets`` sources: the field holding each document's text."""
    cache_dir: str | None = setting(None, RESUMABLE)
    """Token cache root; default ``$OUTLIERLAB_CACHE`` or ``~/.cache/outlierlab``."""

    def __post_init__(self) -> None:
        if not isinstance(self.source, str) or not self.source:
            raise bad("data.source", self.source, "'stdlib', a file, a folder, a glob or a .jsonl")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise bad("data.tokenizer", self.tokenizer, "'bytes', 'bpe' or a tokenizer.json path")
        number("data.vocab_size", self.vocab_size, lo=258, hi=2**32, integer=True)
        self.val_fraction = number("data.val_fraction", self.val_fraction, lo=0, hi=1,
                                   lo_open=True, hi_open=True)
        flag("data.include_tests", self.include_tests)
        if not isinstance(self.text_field, str) or not self.text_field:
            raise bad("data.text_field", self.text_field, "a non-empty string")
        if self.cache_dir is not None and not isinstance(self.cache_dir, (str, os.PathLike)):
            raise bad("data.cache_dir", self.cache_dir, "a path or null")
        if self.cache_dir is not None:
            self.cache_dir = str(self.cache_dir)

    def cache_root(self) -> Path:
        """``cache_dir``, else :func:`default_cache_root`."""
        if self.cache_dir:
            return Path(self.cache_dir).expanduser()
        return default_cache_root()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DataConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"unknown data field(s) {unknown}; allowed: {sorted(names)}")
        return cls(**d)
