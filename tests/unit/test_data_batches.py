"""BatchSampler (random windows, resumable, per rank) and validation_windows."""

import json

import numpy as np
import pytest
import torch

from outlierlab.data import BatchSampler, document_starts, document_windows, validation_windows
from outlierlab.errors import DataError

TOKENS = np.arange(1000, dtype=np.uint16)  # distinct values: a window's start is its first id


def test_windows_are_slices_of_the_memmap(tmp_path):
    path = tmp_path / "t.bin"
    TOKENS.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    s = BatchSampler(mm, seq_len=16, batch_size=8, seed=3)
    starts = set()
    for _ in range(5):
        x, y = s.next()
        assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.int64
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            i = int(row_x[0])
            starts.add(i)
            assert np.array_equal(row_x, TOKENS[i : i + 16])
            assert np.array_equal(row_y, TOKENS[i + 1 : i + 17])
    assert s.batches == 5 and len(starts) > 30  # random starts, not a fixed few


def test_windows_cover_the_ends():
    toks = np.arange(20, dtype=np.uint16)
    s = BatchSampler(toks, seq_len=19, batch_size=4, seed=0)
    x, y = s.next()
    assert torch.equal(x[0], torch.arange(19)) and torch.equal(y[0], torch.arange(1, 20))


def test_state_round_trip_reproduces_next_batches():
    a = BatchSampler(TOKENS, seq_len=32, batch_size=4, seed=7)
    for _ in range(3):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))
    expected = [a.next() for _ in range(4)]
    b = BatchSampler(TOKENS, seq_len=32, batch_size=4, seed=7)
    b.load_state_dict(state)
    for (ex, ey), (gx, gy) in zip(expected, (b.next() for _ in range(4))):
        assert torch.equal(ex, gx) and torch.equal(ey, gy)
    assert b.batches == a.batches == 7


def test_same_seed_same_batches_and_ranks_differ():
    a = BatchSampler(TOKENS, 32, 8, seed=1, rank=0, world_size=2)
    a2 = BatchSampler(TOKENS, 32, 8, seed=1, rank=0, world_size=2)
    b = BatchSampler(TOKENS, 32, 8, seed=1, rank=1, world_size=2)
    xa, xa2, xb = a.next()[0], a2.next()[0], b.next()[0]
    assert torch.equal(xa, xa2) and not torch.equal(xa, xb)


def test_state_from_another_rank_is_replayed_for_this_rank():
    r1 = BatchSampler(TOKENS, 32, 4, seed=5, rank=1, world_size=2)
    for _ in range(6):
        r1.next()
    expected = r1.next()
    r0 = BatchSampler(TOKENS, 32, 4, seed=5, rank=0, world_size=2)
    for _ in range(6):
        r0.next()
    resumed = BatchSampler(TOKENS, 32, 4, seed=5, rank=1, world_size=2)
    resumed.load_state_dict(r0.state_dict())  # e.g. a checkpoint saved by rank 0
    got = resumed.next()
    assert torch.equal(got[0], expected[0])


def test_sampler_errors():
    with pytest.raises(
        DataError, match="seq_len 1000 needs at least 1001 tokens but the train split has 1000"
    ):
        BatchSampler(TOKENS, 1000, 2, seed=0)
    with pytest.raises(DataError, match="batch_size"):
        BatchSampler(TOKENS, 10, 0, seed=0)
    with pytest.raises(DataError, match="rank"):
        BatchSampler(TOKENS, 10, 2, seed=0, rank=2, world_size=2)
    s = BatchSampler(TOKENS, 10, 2, seed=0)
    with pytest.raises(DataError, match="seed 1 but this sampler has seed 0"):
        s.load_state_dict(BatchSampler(TOKENS, 10, 2, seed=1).state_dict())
    with pytest.raises(DataError, match="malformed"):
        s.load_state_dict({"seed": 0})


def test_validation_windows_are_first_strided_windows():
    x, y = validation_windows(TOKENS, seq_len=10, n_windows=3)
    assert x.shape == (3, 10) and x.dtype == torch.int64
    ref = TOKENS.astype(np.int64)
    for i in range(3):
        assert np.array_equal(x[i].numpy(), ref[i * 10 : i * 10 + 10])
        assert np.array_equal(y[i].numpy(), ref[i * 10 + 1 : i * 10 + 11])
    x2, _ = validation_windows(TOKENS, seq_len=10, n_windows=3)
    assert torch.equal(x, x2)


def test_validation_windows_cap_and_errors():
    x, _ = validation_windows(TOKENS[:31], seq_len=10)
    assert x.shape == (3, 10)
    with pytest.warns(UserWarning, match="only 3 windows"):
        x, _ = validation_windows(TOKENS[:31], seq_len=10, n_windows=5)
    assert x.shape == (3, 10)
    with pytest.raises(
        DataError, match="seq_len 40 needs at least 41 tokens but the validation split has 31"
    ):
        validation_windows(TOKENS[:31], seq_len=40)


def _docs(lengths, eot=0):
    """Documents of the given lengths (tokens 1..9), each followed by ``eot``."""
    rng = np.random.default_rng(0)
    return np.concatenate([np.append(rng.integers(1, 10, n), eot) for n in lengths])


def test_document_windows_spread_over_many_documents():
    lengths = [5 + (7 * i) % 40 for i in range(120)]  # 120 documents of 5..44 tokens
    toks = _docs(lengths)
    starts = document_starts(toks, 0)
    assert len(starts) == 120 and starts[1] == lengths[0] + 1
    x, y = document_windows(toks, 8, 100, 60, eot_id=0)
    assert x.shape == y.shape == (100, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # y is x shifted by one
    begin = []
    for row in x.numpy():  # where each window starts in the split (windows are unique)
        hits = [i for i in range(len(toks) - 8) if np.array_equal(toks[i:i + 8], row)]
        begin.append(hits[0])
    doc = np.searchsorted(starts, begin, side="right") - 1
    # 60 documents at evenly spaced places of the split, each with its first window
    chosen = sorted(set(np.round(np.linspace(0, 119, 60)).astype(int)))
    assert sorted(set(doc)) == chosen
    for b, d in zip(begin, doc):
        assert (b - starts[d]) % 8 == 0  # k · seq_len into its document
        assert b == starts[d] or b + 9 <= starts[d] + lengths[d] + 1  # later ones fit inside
    # fixed: the same tokens give the same windows
    assert torch.equal(document_windows(toks, 8, 100, 60, eot_id=0)[0], x)


def test_document_windows_warn_when_the_split_is_too_small():
    toks = _docs([20] * 10)
    with pytest.warns(UserWarning, match="only 10 documents"):
        x, _ = document_windows(toks, 8, 12, 50, eot_id=0)
    assert x.shape[0] == 12  # 10 documents hold 2 windows each of 8 + 1 tokens in 21
    with pytest.warns(UserWarning, match="hold only 20 windows"):
        x, _ = document_windows(toks, 8, 40, 10, eot_id=0)
    assert x.shape[0] == 20
    with pytest.raises(DataError, match="n_docs must be a positive integer"):
        document_windows(toks, 8, 4, 0, eot_id=0)
