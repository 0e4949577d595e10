"""The Checkpointer: atomic layout, keep-last-N, its own timing, leftovers of a killed write,
a restore of every Stateful, and the RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import torch

from outlierlab.data import BatchSampler
from outlierlab.model import GPT, GPTConfig
from outlierlab.run_folder import CheckpointFiles, RunFolder
from outlierlab.train import checkpoint as ckpt
from outlierlab.train import distributed


class Counters:
    def __init__(self) -> None:
        self.step = self.tokens = 0


def small(run: RunFolder, every: int = 0, keep: int = 2):
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=32, n_layer=1, d_model=8, n_head=2, seq_len=4))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    counters = Counters()
    sampler = BatchSampler(np.arange(200, dtype=np.uint16), 4, 2, seed=3)
    dist = distributed.init("cpu")
    states = {"model": m, "optimizer": opt, "progress": ckpt.RunProgress(counters, 2, 1),
              "sampler": sampler, "rng": ckpt.RNGState(dist)}
    return ckpt.Checkpointer(run, states, dist, every=every, keep=keep), m, opt, counters, sampler


def test_keep_last_n_and_ignore_partial_writes(tmp_path):
    run = RunFolder(tmp_path)
    saver, *_ , counters, _ = small(run)
    root = run.checkpoints
    for step in (1, 2, 3):
        counters.step = counters.tokens = step
        assert saver.save(step, last_step=True)
    assert [s for s, _ in run.checkpoint_list()] == [2, 3]
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]
    (root / ".tmp-step-4-123").mkdir()  # a write killed half-way
    (root / ".old-step-1-123").mkdir()  # a deletion killed half-way
    (root / "step-5").mkdir()  # no state.json: not a checkpoint (half-deleted by old versions)
    (root / "step-5" / "optim.pt").write_bytes(b"x")
    assert run.latest_checkpoint == root / "step-3"
    run.clean_partial_checkpoints()
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]
    saver.saved_at = -1
    assert saver.save(3, last_step=True)  # rewrite in place
    again = saver.latest
    assert again == root / "step-3" and CheckpointFiles(again).optimizer.is_file()
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]


def test_the_checkpointer_decides_when(tmp_path):
    saver, *_ = small(RunFolder(tmp_path), every=3)
    assert [s for s in range(1, 8) if saver.should_save(s)] == [3, 6]
    assert saver.should_save(7, last_step=True)  # the last step, or a stop
    assert saver.save(3) and not saver.save(3, last_step=True)  # never twice
    assert not saver.save(4)


def test_restore_brings_back_every_state(tmp_path):
    run = RunFolder(tmp_path)
    saver, m, opt, counters, sampler = small(run)
    x = torch.randint(0, 32, (2, 4))
    _, loss = m(x, x)
    loss.backward()
    opt.step()
    sampler.next()
    counters.step, counters.tokens = 7, 56
    torch.manual_seed(123)
    assert saver.save(7, last_step=True)
    after = (torch.rand(2), sampler.next()[0])
    saver2, m2, opt2, counters2, sampler2 = small(run)
    assert saver2.restore() == run.checkpoint_path(7)
    assert (counters2.step, counters2.tokens, saver2.saved_at) == (7, 56, 7)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  m2.state_dict().values()))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert torch.equal(torch.rand(2), after[0]) and torch.equal(sampler2.next()[0], after[1])


def test_a_changed_global_batch_is_refused(tmp_path):
    import pytest

    from outlierlab.errors import ConfigError

    run = RunFolder(tmp_path)
    saver, *_ = small(run)
    saver.save(1, last_step=True)
    saver2, *_ = small(run)
    saver2.states["progress"] = ckpt.RunProgress(Counters(), 4, 1)
    with pytest.raises(ConfigError, match=r"global batch .* was 2, now 4"):
        saver2.restore()


def test_rng_state_round_trip():
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
