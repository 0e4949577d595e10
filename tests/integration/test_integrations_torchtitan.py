"""`outlierlab.integrations.torchtitan.attach` on a torchtitan-shaped trainer, on CPU.

torchtitan itself is not installed in CI: its models import triton (~1 GB installed), and its
Trainer needs three patches on a CPU-only torch (tests/integration/titan_cpu.py). The stand-in
below has the shape attach relies on, read from torchtitan 0.3.0's source
(``torchtitan/trainer.py``, ``models/common/decoder.py``, ``components/metrics.py``): a
``Decoder`` with ``tok_embeddings``, blocks in an ``nn.ModuleDict`` keyed "0", "1", …, ``norm``
and ``lm_head``, blocks called as ``layer(h, attention_masks, positions)``; a trainer whose
``train()`` advances ``self.step`` and then calls ``self.train_step(data_iterator)`` (gradient
accumulation inside), with ``model_parts``, ``parallel_dims`` and
``metrics_processor.logger.log(metrics, step)``. The real trainer is tested by
test_torchtitan_real.py where torchtitan is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from outlierlab.errors import ConfigError
from outlierlab.integrations.torchtitan import attach
from tolerances import F32_SUMS

VOCAB, D, SEQ, BATCH = 64, 32, 16, 4


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attention_norm = nn.RMSNorm(D)
        self.feed_forward = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, h, attention_masks=None, positions=None):
        return h + self.feed_forward(self.attention_norm(h))


class Decoder(nn.Module):
    def __init__(self, n_layer: int = 2) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(VOCAB, D)
        self.layers = nn.ModuleDict({str(i): Block() for i in range(n_layer)})
        self.norm = nn.RMSNorm(D)
        self.lm_head = nn.Linear(D, VOCAB, bias=False)

    def forward(self, tokens, positions=None, attention_masks=None):
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, attention_masks, positions)
        return self.lm_head(self.norm(h))


class Recorder:
    """torchtitan's ``LoggerContainer``: ``log(metrics, step)``."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, dict]] = []

    def log(self, metrics, step):
        self.rows.append((step, dict(metrics)))


class MetricsProcessor:
    def __init__(self) -> None:
        self.logger = Recorder()


class ParallelDims:
    pp_enabled = tp_enabled = False


class TitanLikeTrainer:
    """The loop of ``torchtitan.trainer.Trainer.train`` / ``train_step``, reduced."""

    def __init__(self, steps: int, accum: int = 2) -> None:
        torch.manual_seed(0)
        self.model_parts = [Decoder()]
        self.metrics_processor = MetricsProcessor()
        self.parallel_dims = ParallelDims()
        self.step, self.steps, self.accum = 0, steps, accum
        self.optimizer = torch.optim.AdamW(self.model_parts[0].parameters(), lr=1e-2)
        self.closed = False

    def batches(self):
        g = torch.Generator().manual_seed(1)
        while True:
            x = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)
            yield {"input": x[:, :-1]}, x[:, 1:]

    def train_step(self, data_iterator):
        self.optimizer.zero_grad()
        for _ in range(self.accum):
            inputs, labels = next(data_iterator)
            pred = self.model_parts[0](inputs["input"])
            loss = nn.functional.cross_entropy(pred.flatten(0, 1), labels.flatten())
            (loss / self.accum).backward()
        self.optimizer.step()

    def train(self):
        it = self.batches()
        while self.step < self.steps:
            self.step += 1
            self.train_step(it)

    def close(self):
        self.closed = True


def kurt64(x: np.ndarray) -> float:
    """Eq. 1 in float64 numpy."""
    s2 = (x.reshape(-1, x.shape[-1]).astype(np.float64) ** 2).mean(0)
    return float((s2**2).mean() / s2.mean() ** 2)


def test_measured_steps_reach_the_metrics_logger_with_the_exact_kurtosis():
    trainer = TitanLikeTrainer(steps=5)
    model = trainer.model_parts[0]
    seen: dict[int, list[torch.Tensor]] = {}
    model.layers["1"].register_forward_hook(
        lambda m, a, out: seen.setdefault(trainer.step, []).append(out.detach().clone()))
    mon = attach(trainer, every=2, cos_max_tokens=64)
    trainer.train()

    rows = trainer.metrics_processor.logger.rows
    assert [s for s, _ in rows] == [2, 4]
    assert [s for s, _ in mon.history] == [2, 4]
    step4 = rows[1][1]
    points = ["embed.resid_post", "blocks.0.resid_post", "blocks.1.resid_post"]
    for p in points:
        assert f"outliers/kurtosis/{p}" in step4 and f"outliers/mmr/{p}" in step4
    # both micro-batches of step 4 (gradient accumulation) and nothing else
    assert len(seen[4]) == 2
    both = torch.cat(seen[4]).numpy()
    assert step4["outliers/tokens"] == 2 * BATCH * SEQ
    assert step4["outliers/kurtosis/blocks.1.resid_post"] == pytest.approx(kurt64(both),
                                                                           rel=F32_SUMS)
    assert step4["outliers/kurtosis_max"] == pytest.approx(
        max(step4[f"outliers/kurtosis/{p}"] for p in points), rel=1e-12)

    trainer.close()  # torchtitan's main calls it: the hooks go with it
    assert trainer.closed and mon.monitor is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.layers.values()
                   if m is not model.layers["1"])


def test_detach_gives_the_trainer_back_and_stops_measuring():
    trainer = TitanLikeTrainer(steps=2, accum=1)
    mon = attach(trainer, every=1)
    mon.detach()
    assert "train_step" not in vars(trainer) and "close" not in vars(trainer)
    trainer.train()
    assert trainer.metrics_processor.logger.rows == [] and mon.history == []


def test_a_failed_step_is_not_measured_and_the_next_one_is():
    trainer = TitanLikeTrainer(steps=3, accum=1)
    mon = attach(trainer, every=1)
    it = trainer.batches()
    trainer.step = 1
    with pytest.raises(StopIteration):
        trainer.train_step(iter(()))
    trainer.step = 2
    trainer.train_step(it)
    assert [s for s, _ in mon.history] == [2]
    assert mon.history[0][1]["outliers/tokens"] == BATCH * SEQ  # nothing left from step 1


@pytest.mark.parametrize("change, says", [
    (lambda t: setattr(t.parallel_dims, "pp_enabled", True), "pipeline parallelism"),
    (lambda t: setattr(t.parallel_dims, "tp_enabled", True), "tensor parallelism"),
    (lambda t: t.model_parts.append(Decoder()), "2 model parts"),
    (lambda t: delattr(t, "metrics_processor"), "no 'metrics_processor'"),
])
def test_unsupported_trainers_are_refused_in_one_line(change, says):
    trainer = TitanLikeTrainer(steps=1)
    trainer.parallel_dims = ParallelDims()
    change(trainer)
    with pytest.raises(ConfigError, match=says):
        attach(trainer, every=1)


def test_auto_finds_the_numbered_block_dict():
    from outlierlab.structure import discover

    s = discover(Decoder(n_layer=3))
    assert s.blocks_name == "layers" and len(s.blocks) == 3 and s.final_norm == "norm"
    assert [p.name for p in s.points()] == [
        "embed.resid_post", "blocks.0.resid_post", "blocks.1.resid_post", "blocks.2.resid_post"]
