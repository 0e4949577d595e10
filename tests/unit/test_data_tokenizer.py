"""Tokenisers: exact round trips (bytes, BPE, user tokenizer.json), save/load, errors."""

import sysconfig
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outlierlab.data import EOT, ByteTokenizer, load_tokenizer, train_bpe
from outlierlab.data.tokenizer import Tokenizer
from outlierlab.errors import DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = [(STDLIB / n).read_text(encoding="utf-8") for n in ("textwrap.py", "json/decoder.py")]
SOURCE = "".join(SOURCES)


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(SOURCES * 2, vocab_size=300)


@given(st.text())
def test_bytes_round_trip_any_unicode(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert all(0 <= i < 256 for i in ids)


def test_bytes_vocab_and_specials():
    tok = ByteTokenizer()
    assert isinstance(tok, Tokenizer)
    assert (tok.vocab_size, tok.eot_id, tok.name) == (257, 256, "bytes")
    assert tok.decode([104, 105, 256, 0xC3]) == "hi" + EOT + "\ufffd"  # lone lead byte → U+FFFD
    with pytest.raises(DataError, match="outside the byte vocabulary"):
        tok.decode([257])
    assert tok.save("/nonexistent") is None


def test_bpe_is_trained_to_its_vocab_size(bpe):
    assert isinstance(bpe, Tokenizer)
    assert bpe.vocab_size == 300 and bpe.name == "bpe-300"
    assert bpe.decode([bpe.eot_id]) == EOT
    ids = bpe.encode(SOURCE)
    assert len(ids) < 0.8 * len(SOURCE.encode())  # merges compress the text it was trained on
    assert max(ids) < 300


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_bpe_round_trip_python_source(bpe, data):
    start = data.draw(st.integers(0, len(SOURCE) - 1))
    length = data.draw(st.integers(0, 400))
    text = SOURCE[start : start + length] + data.draw(st.text(max_size=20))
    assert bpe.decode(bpe.encode(text)) == text


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_unicode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_encode_batch_matches_encode(bpe):
    docs = ["def f():\n    pass\n", "", "x = 'é'  # ∑\n"]
    assert [list(a) for a in bpe.encode_batch(docs)] == [bpe.encode(d) for d in docs]


def test_save_and_load_tokenizer_json(bpe, tmp_path):
    path = bpe.save(tmp_path / "run")
    assert path == tmp_path / "run" / "tokenizer.json"
    for spec in (path, str(path), tmp_path / "run"):  # file or the folder holding it
        tok = load_tokenizer(spec)
        assert tok.vocab_size == 300 and tok.eot_id == bpe.eot_id
        assert tok.encode(SOURCE[:500]) == bpe.encode(SOURCE[:500])
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)


def test_load_tokenizer_errors(tmp_path):
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match=f"tokenizer file {bad} does not parse"):
        load_tokenizer(bad)
    with pytest.raises(DataError, match="no such file"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(DataError, match="trained on a corpus"):
        load_tokenizer("bpe")
    with pytest.raises(DataError, match="at least 258"):
        train_bpe(["abc"], vocab_size=100)


def test_tokenizer_without_eot_is_rejected(tmp_path):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    with pytest.raises(DataError, match=r"has no <\|endoftext\|> token"):
        load_tokenizer(path)


def test_bpe_training_is_deterministic(bpe):
    assert train_bpe(SOURCES * 2, vocab_size=300).to_json() == bpe.to_json()
