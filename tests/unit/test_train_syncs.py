"""Host-device syncs (issue 24): a plain training step reads nothing on the host; unread steps
give the same weights as read ones; a non-finite loss on an unread step is found later."""

from __future__ import annotations

import copy

import pytest
import torch

from outlierlab.model import GPT, GPTConfig
from outlierlab.train import TrainStep
from outlierlab.train.syncs import SyncCounter


def tiny():
    torch.manual_seed(0)
    cfg = GPTConfig.preset("pre-ln", n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64)
    return GPT(cfg)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = torch.randint(0, 64, (4, 17), generator=g)
        out.append((w[:, :-1].contiguous(), w[:, 1:].contiguous()))
    return out


def test_counter_sees_host_reads_and_restores_tensor_methods():
    t = torch.ones(3)
    item = torch.Tensor.item
    with SyncCounter("cpu") as c:
        t.sum().item()
        t.tolist()
        bool(t[0] > 0)
        float(t[1])
        t * 2  # not a read
    assert c.count == 4 and c.calls[0].startswith("item test_train_syncs.py:")
    assert torch.Tensor.item is item
    with SyncCounter("cpu") as c:
        pass
    assert c.count == 0


def test_unread_steps_sync_nothing_and_match_read_steps_bit_for_bit():
    data = batches(6)
    a, b = tiny(), copy.deepcopy(tiny())
    step_a = TrainStep(a, torch.optim.AdamW(a.parameters(), lr=1e-2), clip=1.0)
    step_b = TrainStep(b, torch.optim.AdamW(b.parameters(), lr=1e-2), clip=1.0)
    losses = [step_a(x, y).loss for x, y in data]
    for i, (x, y) in enumerate(data):
        read = i in (2, 5)
        with SyncCounter("cpu") as c:
            out = step_b(x, y, read=read)
        if read:
            assert c.count >= 1 and out.loss == losses[i] and out.back == 0
        else:
            assert c.count == 0 and out is None, c.calls
    for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), k


def test_nonfinite_unread_step_is_reported_at_the_read():
    m = tiny()
    step = TrainStep(m, torch.optim.SGD(m.parameters(), lr=1e-2))
    data = batches(4)
    assert step(*data[0], read=False) is None
    with torch.no_grad():  # spoil the weights: step 2's loss is NaN
        m.lm_head.weight.fill_(float("nan"))
    assert step(*data[1], read=False) is None
    out = step(*data[2], read=True)
    assert not out.finite and out.back == 1
    with pytest.raises(RuntimeError, match="no step to read"):
        step.read()
