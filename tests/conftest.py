"""Shared fixtures. Tests make their own tiny models and data; nothing is downloaded."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# GGUF files convert afresh on every load in tests (no state kept between tests); the cache is
# tested by itself (tests/integration/test_gguf_cache.py) with the `gguf_cache` fixture.
os.environ["OUTLIERLAB_GGUF_CACHE"] = "off"
# Tiny models run faster on one thread, and subprocess tests (DDP, CLI) need the other core.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test runs on one torch thread, whatever an earlier test left: tiny matmuls gain
    nothing from threads, two threads on a busy 2-core machine can be 50× slower (spinning
    workers), and subprocesses started with OMP_NUM_THREADS=1 then run the same kernels and
    give the same bits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    """A private outlierlab cache folder (corpus, tokens, tokenizers) for one test."""
    d = tmp_path / "cache"
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(d))
    return d


@pytest.fixture
def gguf_cache(tmp_path, monkeypatch):
    """The GGUF conversion cache on, in a private folder; returns that folder's ``gguf``."""
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OUTLIERLAB_GGUF_CACHE", "on")
    return tmp_path / "cache" / "gguf"


@pytest.fixture(params=["ops", "fused"])
def hook_path(request, monkeypatch) -> str:
    """The monitor's torch/numpy ops (numba off) or the fused numba kernels of
    :mod:`outlierlab.fused` (skipped without numba): tests taking it run both."""
    from outlierlab import fused

    if request.param == "fused":
        pytest.importorskip("numba")
        monkeypatch.delenv(fused.ENV, raising=False)
        monkeypatch.setattr(fused, "_kernels", None)
        assert fused.available()
    else:
        monkeypatch.setattr(fused, "_kernels", False)
    return request.param
