"""OutlierCallback in a real Lightning Trainer on a random-init tiny GPT-2, on CPU.

Skipped when lightning is not installed (it is an optional extra)."""

from __future__ import annotations

import csv
import logging

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec")
pytest.importorskip("transformers")

import lightning as L  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from tiny_gpt2 import PLANTED, POINTS, SEQ, tiny_gpt2  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from outlierlab.integrations.lightning import OutlierCallback  # noqa: E402

BATCH = 4



class TinyLM(L.LightningModule):
    def __init__(self, lr: float = 1e-3, planted: bool = False):
        super().__init__()
        self.model = tiny_gpt2(planted)
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return self.model(batch, labels=batch).loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def batches(n: int) -> torch.Tensor:
    return torch.randint(0, 64, (n * BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def fit(tmp_path, module, cb, *, steps, accum=1):
    data = batches(steps * accum)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        accumulate_grad_batches=accum,
        callbacks=[cb],
        logger=CSVLogger(tmp_path, name="run"),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=BATCH, shuffle=False))
    return trainer, data


def kurt64(x: np.ndarray) -> float:
    """Eq. 1 in float64 numpy."""
    s2 = (x.reshape(-1, x.shape[-1]).astype(np.float64) ** 2).mean(0)
    return float((s2**2).mean() / s2.mean() ** 2)


def test_logs_at_the_measured_steps_and_removes_hooks(tmp_path):
    module = TinyLM()
    before = sum(len(m._forward_hooks) for m in module.modules())
    cb = OutlierCallback(every=2, model_attr="model")
    trainer, _ = fit(tmp_path, module, cb, steps=5)
    assert [s for s, _ in cb.history] == [2, 4]
    for _, metrics in cb.history:
        assert metrics["outliers/tokens"] == BATCH * SEQ
        for p in POINTS:
            assert 1.0 <= metrics[f"outliers/kurtosis/{p}"] < 10
    assert "outliers/kurtosis_max" in trainer.callback_metrics
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    logged = [r for r in rows if r.get("outliers/kurtosis_max")]
    # Lightning writes optimiser step s at logger step s - 1; only measured steps carry values
    assert [int(r["step"]) for r in logged] == [1, 3]
    assert [float(r["outliers/kurtosis_max"]) for r in logged] == pytest.approx(
        [m["outliers/kurtosis_max"] for _, m in cb.history]
    )
    assert sum(len(m._forward_hooks) for m in module.modules()) == before


def test_accumulation_measures_all_micro_batches_of_the_step(tmp_path):
    module = TinyLM(lr=0.0)  # weights fixed: recompute by hand afterwards
    cb = OutlierCallback(every=2, model_attr="model")
    accum = 3
    _, data = fit(tmp_path, module, cb, steps=2, accum=accum)
    assert [s for s, _ in cb.history] == [2]
    metrics = cb.history[0][1]
    assert metrics["outliers/tokens"] == accum * BATCH * SEQ
    ids = data[accum * BATCH : 2 * accum * BATCH]  # step 2's micro-batches
    with torch.no_grad():
        emb = module.model(ids, output_hidden_states=True).hidden_states[0]
    assert metrics["outliers/kurtosis/embed.resid_post"] == pytest.approx(
        kurt64(emb.double().numpy()), rel=1e-4
    )


def test_alert_fires_once_on_planted_outlier_and_never_on_clean(tmp_path, caplog):
    planted = OutlierCallback(every=1, alert_kurtosis=10.0, model_attr="model")
    clean = OutlierCallback(every=1, alert_kurtosis=10.0, model_attr="model")
    with caplog.at_level(logging.WARNING, logger="outlierlab"):
        fit(tmp_path / "a", TinyLM(lr=1e-4, planted=True), planted, steps=3)
        fit(tmp_path / "b", TinyLM(), clean, steps=3)
    records = [r for r in caplog.records if r.name == "outlierlab"]
    assert len(records) == 1
    assert planted.alert_fired.step == 1 and planted.alert_fired.neurons[0] == PLANTED
    assert clean.alert_fired is None


def test_auto_finds_the_wrapped_network(tmp_path):
    cb = OutlierCallback(every=1)  # no model_attr: the one known child, module.model
    fit(tmp_path, TinyLM(), cb, steps=1)
    assert list(cb.last_results) == POINTS


def test_unknown_model_attr_is_a_config_error(tmp_path):
    from outlierlab.errors import ConfigError

    with pytest.raises(ConfigError, match="model_attr"):
        fit(tmp_path, TinyLM(), OutlierCallback(every=1, model_attr="net"), steps=1)
