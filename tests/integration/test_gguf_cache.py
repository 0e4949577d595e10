"""The GGUF conversion cache (``outlierlab.gguf.cached``): a changed file gets a new entry, a
damaged entry is converted again and replaced, an unwritable cache costs only the next load's
time, and ``OUTLIERLAB_GGUF_CACHE=off`` keeps nothing. (That an entry loads as the same model is
tested per architecture in test_gguf_archs.py.)"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytestmark = pytest.mark.hf

from tiny_llama import EOS, tiny_llama, write_gguf  # noqa: E402


@pytest.fixture
def gguf_file(tmp_path):
    (tmp_path / "model").mkdir()
    return write_gguf(tiny_llama(planted=True), tmp_path / "model" / "tiny.gguf")


def _logits(loaded):
    x = torch.arange(24).reshape(2, 12) % EOS
    with torch.no_grad():
        return loaded.logits(x)


def test_a_changed_file_gets_a_new_entry(gguf_file, gguf_cache):
    from outlierlab import gguf
    from outlierlab.loading import load_model

    first = gguf.cached(gguf_file)
    load_model(gguf_file)
    assert (first / gguf.SOURCE_FILE).is_file()
    st = gguf_file.stat()
    os.utime(gguf_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was rewritten
    second = gguf.cached(gguf_file)
    assert second != first and not second.exists()
    load_model(gguf_file)
    assert sorted(p.name for p in gguf_cache.iterdir()) == sorted([first.name, second.name])


def test_a_damaged_entry_is_converted_again(gguf_file, gguf_cache, capsys):
    from outlierlab import gguf
    from outlierlab.loading import load_model

    want = _logits(load_model(gguf_file))
    entry = gguf.cached(gguf_file)
    (entry / "model.safetensors").write_bytes(b"truncated")
    loaded = load_model(gguf_file)
    assert "unreadable" in capsys.readouterr().err
    torch.testing.assert_close(_logits(loaded), want, rtol=0, atol=0)
    assert (entry / "model.safetensors").stat().st_size > 1000  # replaced by a whole entry
    torch.testing.assert_close(_logits(load_model(gguf_file)), want, rtol=0, atol=0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_cache_still_loads(gguf_file, gguf_cache, capsys):
    from outlierlab.loading import load_model

    gguf_cache.mkdir(parents=True)
    gguf_cache.chmod(0o500)
    try:
        loaded = load_model(gguf_file)
    finally:
        gguf_cache.chmod(0o700)
    assert "cannot keep" in capsys.readouterr().err and "kept in" not in loaded.describe()


def test_a_failed_save_still_loads(gguf_file, gguf_cache, monkeypatch, capsys):
    from outlierlab import gguf
    from outlierlab.loading import load_model

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf, "_save_hf", full_disk)
    loaded = load_model(gguf_file)
    assert "No space left" in capsys.readouterr().err
    assert not gguf_cache.exists() or not any(gguf_cache.iterdir())  # no half entry left
    assert "kept in" not in loaded.describe()


def test_off_keeps_nothing(gguf_file, gguf_cache, monkeypatch):
    from outlierlab import gguf
    from outlierlab.loading import load_model

    monkeypatch.setenv("OUTLIERLAB_GGUF_CACHE", "off")
    assert gguf.cached(gguf_file) is None
    load_model(gguf_file)
    assert not gguf_cache.exists()
