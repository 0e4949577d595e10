"""Shared fixtures. Tests make their own tiny models and data; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tiny models run faster on one thread, and subprocess tests (DDP, CLI) need the other core.
torch.set_num_threads(1)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private outlierlab cache folder (corpus, tokens, tokenizers) for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(d))
    return d
