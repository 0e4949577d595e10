"""StatsAccumulator.all_reduce (and the monitor's attention entropy) over 2 real gloo
processes equals the one-shot metrics."""

from __future__ import annotations

import json
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from outlierlab import metrics as M
from outlierlab.model import GPT, GPTConfig
from outlierlab.monitor import OutlierMonitor
from outlierlab.stats import StatsAccumulator


def _data():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 64, 32, generator=g)
    x[..., 5] *= 20
    return x


def _gpt_and_batch() -> tuple[GPT, torch.Tensor]:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=16, vocab_size=64)).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.qkv.weight.mul_(20)  # sharp attention: entropy differs between sequences
    return model, torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(3))


def _attn_entropy(model: GPT, idx: torch.Tensor, all_reduce: bool = False) -> dict:
    with OutlierMonitor(model, attn_max_tokens=None) as mon, torch.no_grad():
        model(idx)
    return mon.attention_entropy(all_reduce=all_reduce)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        acc = StatsAccumulator(32).update(_data()[rank])
        acc.add_cos(0.2 * (rank + 1))
        acc.all_reduce()
        model, idx = _gpt_and_batch()
        entropy = _attn_entropy(model, idx[2 * rank : 2 * rank + 2], all_reduce=True)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({**acc.result(), "attn_entropy": entropy}, f)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_all_reduce(tmp_path):
    out = str(tmp_path / "res")
    # fork: children reuse the imported torch (spawn re-imports it: ~10 s each on 2 cores)
    mp.start_processes(
        _worker, args=(2, _free_port(), out), nprocs=2, join=True, start_method="fork"
    )
    x = _data()
    for rank in range(2):
        with open(f"{out}.{rank}") as f:
            res = json.load(f)
        assert res["tokens"] == 128
        assert res["kurtosis"] == pytest.approx(M.kurtosis(x), rel=1e-12)
        assert res["mmr"] == pytest.approx(M.max_median_ratio(x), rel=1e-12)
        assert res["kurtosis_centred"] == pytest.approx(M.kurtosis_centred(x), rel=1e-10)
        assert res["kurtosis_authors"] == pytest.approx(M.kurtosis_authors(x), rel=1e-10)
        assert res["corr_authors"] == pytest.approx(M.corr_authors(x), rel=1e-9)
        model, idx = _gpt_and_batch()
        full, local = _attn_entropy(model, idx), _attn_entropy(model, idx[2 * rank : 2 * rank + 2])
        assert res["attn_entropy"] == pytest.approx(full, rel=1e-6)
        assert local != pytest.approx(full, rel=1e-3)  # so the sum over ranks mattered
        assert res["cos_sim"] == pytest.approx(0.3)
        assert res["outlier_neurons"] == M.outlier_neurons(x) == [5]
