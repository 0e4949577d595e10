"""The monitor on compiled modules. torchtitan compiles each block with
``module.compile(fullgraph=True)``, which compiles the module's hooks with it; the monitor's
hooks run eagerly (``structure._eager``), so a compiled model measures what an eager one does."""

from __future__ import annotations

import pytest
import torch

from outlierlab import OutlierMonitor
from outlierlab.model import GPT, GPTConfig

FIELDS = ("kurtosis", "mmr", "cos_sim", "kurtosis_authors", "corr_authors", "tokens")


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64))


IDX = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(1))


def measure(model: GPT, net, every: int = 1, forwards: int = 1, **kw):
    with OutlierMonitor(model, every=every, **kw) as mon:
        for _ in range(forwards):
            net(IDX)  # with grad, as in training
    return mon.results(), mon.attention_entropy()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def same(got: dict, want: dict) -> None:
    assert list(got) == list(want)
    for point, v in want.items():
        for k in FIELDS:
            assert got[point][k] == pytest.approx(v[k], rel=1e-6), (point, k)


def test_blocks_compiled_with_fullgraph_measure_as_eager():
    eager = gpt()
    want, _ = measure(eager, eager, attn_entropy=False)
    model = gpt()
    for b in model.blocks:
        b.compile(backend="eager", fullgraph=True)
    got, _ = measure(model, model, attn_entropy=False)
    same(got, want)
    got, _ = measure(model, model, every=2, forwards=3, attn_entropy=False)  # 0 and 2 measured
    assert all(v["tokens"] == 2 * IDX.numel() for v in got.values())


def test_whole_model_compiled_measures_attention_entropy_too():
    eager = gpt()
    want, want_h = measure(eager, eager)
    model = gpt()
    got, got_h = measure(model, torch.compile(model, backend="eager"))
    same(got, want)
    assert got_h == pytest.approx(want_h, rel=1e-6) and len(got_h) == 2
