"""Data: corpus collection, tokenisers, the memory-mapped token cache, batches.

``from outlierlab.data import DataConfig, prepare, BatchSampler, validation_windows,
document_windows, load_tokenizer``. Names are imported lazily, so reading ``DataConfig`` does
not import torch.
See docs/data.md.
"""

from __future__ import annotations

from importlib import import_module

from outlierlab.data.config import DataConfig

_LAZY = {
    "prepare": "outlierlab.data.pipeline",
    "PreparedData": "outlierlab.data.pipeline",
    "BatchSampler": "outlierlab.data.batches",
    "validation_windows": "outlierlab.data.batches",
    "document_windows": "outlierlab.data.batches",
    "document_starts": "outlierlab.data.batches",
    "load_tokenizer": "outlierlab.data.tokenizer",
    "ByteTokenizer": "outlierlab.data.tokenizer",
    "HFTokenizer": "outlierlab.data.tokenizer",
    "Tokenizer": "outlierlab.data.tokenizer",
    "train_bpe": "outlierlab.data.tokenizer",
    "EOT": "outlierlab.data.tokenizer",
    "collect": "outlierlab.data.corpus",
    "split_documents": "outlierlab.data.corpus",
}

__all__ = ["DataConfig", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'outlierlab.data' has no attribute {name!r}")
