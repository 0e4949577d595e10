"""prepare(): the token cache (fingerprint, memmaps, reuse without rebuilding)."""

import json
import os

import numpy as np
import pytest

from outlierlab.data import DataConfig, prepare
from outlierlab.errors import DataError


def make_corpus(root, n=40):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"mod{i}.py").write_text(
            f"def f{i}(x):\n    return x * {i}  # é ∑ {i}\n" * (1 + i % 4)
        )
    return root


def test_bytes_tokens_are_the_documents_joined_by_eot(tmp_path, cache_dir):
    src = make_corpus(tmp_path / "src")
    data = prepare(DataConfig(source=str(src), val_fraction=0.2))
    tok = data.tokenizer
    assert tok.vocab_size == 257 and tok.eot_id == 256
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    assert data.path.parent == cache_dir / "tokens"
    # every document appears whole, followed by eot; the splits are disjoint
    texts = {}
    for split in (data.train, data.val):
        arr = np.asarray(split)
        assert arr[-1] == tok.eot_id
        cuts = np.flatnonzero(arr == tok.eot_id)
        starts = np.concatenate([[0], cuts[:-1] + 1])
        docs = [tok.decode(arr[s:e]) for s, e in zip(starts, cuts)]
        texts[id(split)] = set(docs)
    train_docs, val_docs = texts[id(data.train)], texts[id(data.val)]
    assert not train_docs & val_docs
    assert train_docs | val_docs == {p.read_text() for p in src.iterdir()}
    fp = data.fingerprint
    json.dumps(fp)
    assert fp["files"] == 40 and fp["train_files"] + fp["val_files"] == 40
    assert fp["bytes"] == sum(len(p.read_bytes()) for p in src.iterdir())
    assert fp["tokenizer"] == "bytes-v1"
    assert len(data.train) == fp["train_bytes"] + fp["train_files"]


def test_same_inputs_same_fingerprint_and_tokens_and_no_rebuild(tmp_path, cache_dir):
    src = make_corpus(tmp_path / "src")
    first = prepare(DataConfig(source=str(src)))
    assert first.built
    mtimes = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}
    second = prepare(DataConfig(source=str(src)))
    assert not second.built
    assert second.fingerprint == first.fingerprint and second.path == first.path
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    assert {p.name: p.stat().st_mtime_ns for p in second.path.iterdir()} == mtimes
    # a fresh cache folder rebuilds to identical tokens
    third = prepare(DataConfig(source=str(src), cache_dir=str(tmp_path / "other")))
    assert third.built and third.key == first.key
    assert np.array_equal(third.train, first.train)


def test_changed_corpus_changes_fingerprint(tmp_path, cache_dir):
    src = make_corpus(tmp_path / "src")
    a = prepare(DataConfig(source=str(src)))
    (src / "mod3.py").write_text("changed = True\n")
    b = prepare(DataConfig(source=str(src)))
    assert b.built and b.key != a.key
    assert b.fingerprint["files_hash"] != a.fingerprint["files_hash"]


def test_damaged_cache_is_rebuilt(tmp_path, cache_dir):
    src = make_corpus(tmp_path / "src")
    a = prepare(DataConfig(source=str(src)))
    expected = np.array(a.train)
    with open(a.path / "train.bin", "r+b") as fh:
        fh.truncate(10)
    b = prepare(DataConfig(source=str(src)))
    assert b.built and np.array_equal(b.train, expected)


def test_no_temporary_files_left(tmp_path, cache_dir):
    data = prepare(DataConfig(source=str(make_corpus(tmp_path / "src"))))
    assert sorted(os.listdir(data.path)) == ["meta.json", "train.bin", "val.bin"]
    meta = json.loads((data.path / "meta.json").read_text())
    assert meta["train_tokens"] == len(data.train) and meta["dtype"] == "<u2"


def test_summary_is_json(tmp_path, cache_dir):
    data = prepare(DataConfig(source=str(make_corpus(tmp_path / "src"))))
    s = json.loads(json.dumps(data.summary()))
    assert s["train_tokens"] == len(data.train) and s["fingerprint"] == data.key


def test_missing_source_raises(cache_dir, tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(DataConfig(source=str(tmp_path / "missing")))


def test_stdlib_bytes(cache_dir):
    data = prepare(DataConfig())
    fp = data.fingerprint
    assert fp["kind"] == "stdlib" and fp["files"] > 300 and fp["bytes"] > 3_000_000
    assert len(data.train) == fp["train_bytes"] + fp["train_files"]
    assert len(data.val) == fp["val_bytes"] + fp["val_files"]
    assert 0.01 < fp["val_bytes"] / fp["bytes"] < 0.15
    assert not prepare(DataConfig()).built


def _docs(tok, arr):
    arr = np.asarray(arr)
    cuts = np.flatnonzero(arr == tok.eot_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(arr[s:e]) for s, e in zip(starts, cuts)]


def test_bpe_trained_on_train_split_saved_and_reused(tmp_path, cache_dir):
    src = make_corpus(tmp_path / "src", n=60)
    cfg = DataConfig(source=str(src), tokenizer="bpe", vocab_size=300, val_fraction=0.2)
    data = prepare(cfg)
    assert data.built and data.tokenizer.vocab_size == 300 and data.tokenizer.name == "bpe-300"
    assert data.fingerprint["tokenizer"] == "bpe-300-v1"
    tok_file = data.path / "tokenizer.json"
    assert tok_file.is_file()
    mtime = tok_file.stat().st_mtime_ns
    texts = {p.read_text() for p in src.iterdir()}
    train, val = _docs(data.tokenizer, data.train), _docs(data.tokenizer, data.val)
    assert set(train) | set(val) == texts and not set(train) & set(val)
    assert len(data.train) < 0.7 * data.fingerprint["train_bytes"]
    again = prepare(cfg)
    assert not again.built and tok_file.stat().st_mtime_ns == mtime
    assert np.array_equal(again.train, data.train)
    assert again.tokenizer.encode("def f1(x):") == data.tokenizer.encode("def f1(x):")
    # other vocab size → other cache folder, other tokenizer
    other = prepare(DataConfig(source=str(src), tokenizer="bpe", vocab_size=280))
    assert other.key != data.key and other.tokenizer.vocab_size == 280


def test_user_tokenizer_json(tmp_path, cache_dir):
    from outlierlab.data import train_bpe

    src = make_corpus(tmp_path / "src")
    mine = train_bpe(["x = [i ** 2 for i in range(10)]\n" * 50, "print('hello')\n"], 270)
    user_file = mine.save(tmp_path / "mine")
    data = prepare(DataConfig(source=str(src), tokenizer=str(user_file)))
    assert data.built and data.tokenizer.vocab_size == 270
    assert data.fingerprint["tokenizer"].startswith("file-")
    assert data.tokenizer.encode("print(x)") == mine.encode("print(x)")
    assert set(_docs(data.tokenizer, data.train)) | set(_docs(data.tokenizer, data.val)) == {
        p.read_text() for p in src.iterdir()
    }
    assert (data.path / "tokenizer.json").read_text() == user_file.read_text()
    assert not prepare(DataConfig(source=str(src), tokenizer=str(user_file))).built
    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    with pytest.raises(DataError, match=r"bad\.json does not parse"):
        prepare(DataConfig(source=str(src), tokenizer=str(bad)))


def test_concurrent_prepares_build_once(tmp_path, cache_dir):
    from concurrent.futures import ThreadPoolExecutor

    src = make_corpus(tmp_path / "src")
    cfg = DataConfig(source=str(src))
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: prepare(cfg, progress=False), range(3)))
    assert sorted(r.built for r in results) == [False, False, True]
    assert all(np.array_equal(r.train, results[0].train) for r in results)


def test_reading_data_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys; from outlierlab.data import DataConfig; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_run_copy_of_trained_bpe_reuses_its_cache(tmp_path, cache_dir):
    src = make_corpus(tmp_path / "src")
    trained = prepare(DataConfig(source=str(src), tokenizer="bpe", vocab_size=290))
    copy = trained.tokenizer.save(tmp_path / "run")  # what the trainer writes to a run folder
    again = prepare(DataConfig(source=str(src), tokenizer=str(copy)))
    assert not again.built and again.path == trained.path
    assert again.fingerprint == trained.fingerprint
    assert again.tokenizer.encode("class C1:") == trained.tokenizer.encode("class C1:")
