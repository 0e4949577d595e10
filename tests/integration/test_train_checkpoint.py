"""Checkpoint files: atomic layout, keep-last-N, leftovers of a killed write, RNG round trip."""

from __future__ import annotations

import random

import numpy as np
import torch

from outlierlab.model import GPT, GPTConfig
from outlierlab.run_folder import RunFolder
from outlierlab.train import checkpoint as ckpt


def small():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=32, n_layer=1, d_model=8, n_head=2, seq_len=4))
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def test_keep_last_n_and_ignore_partial_writes(tmp_path):
    m, opt = small()
    run = RunFolder(tmp_path)
    root = run.checkpoints
    for step in (1, 2, 3):
        ckpt.save_checkpoint(run, step, m, opt, {"tokens": step}, keep=2)
    assert [s for s, _ in run.checkpoint_list()] == [2, 3]
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]
    (root / ".tmp-step-4-123").mkdir()  # a write killed half-way
    (root / ".old-step-1-123").mkdir()  # a deletion killed half-way
    (root / "step-5").mkdir()  # no state.json: not a checkpoint (half-deleted by old versions)
    (root / "step-5" / "optim.pt").write_bytes(b"x")
    assert run.latest_checkpoint == root / "step-3"
    ckpt.clean_partial(run)
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]
    again = ckpt.save_checkpoint(run, 3, m, opt, {"tokens": 3}, keep=2)  # rewrite in place
    assert again == root / "step-3" and (again / "optim.pt").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-3"]


def test_load_restores_weights_and_optimizer(tmp_path):
    m, opt = small()
    x = torch.randint(0, 32, (2, 4))
    _, loss = m(x, x)
    loss.backward()
    opt.step()
    path = ckpt.save_checkpoint(RunFolder(tmp_path), 7, m, opt, {"tokens": 56}, keep=1)
    m2, opt2 = small()
    state = ckpt.load_checkpoint(path, m2, opt2)
    assert state["step"] == 7 and state["tokens"] == 56
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(),
                                                  m2.state_dict().values()))
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


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
