"""OutlierCallback in a real transformers.Trainer on a random-init tiny GPT-2, on CPU."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers.Trainer needs it

from tiny_gpt2 import PLANTED, POINTS, SEQ, tiny_gpt2  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from outlierlab.integrations.hf import OutlierCallback  # noqa: E402

pytestmark = pytest.mark.hf

BATCH = 4



def dataset(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (n, SEQ), generator=g)
    return [
        {"input_ids": x, "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": x}
        for x in ids
    ]


def make_trainer(
    tmp_path,
    model,
    cb,
    *,
    steps,
    accum=1,
    lr=1e-3,
    logging_steps=1,
    report_to=(),
    attach=True,
    checkpointing=False,
):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        report_to=list(report_to),
        per_device_train_batch_size=BATCH,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=lr,
        logging_steps=logging_steps,
        save_strategy="no",
        train_sampling_strategy="sequential",
        disable_tqdm=True,
        seed=0,
        activation_checkpointing=checkpointing,
    )
    data = dataset(steps * accum * BATCH)
    if attach:
        trainer = Trainer(model=model, args=args, train_dataset=data)
        cb.attach(trainer)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[cb])
    return trainer, data


def measured(log_history, key="outliers/kurtosis_mean"):
    return {e["step"]: e for e in log_history if key in e}


def kurt64(x: np.ndarray) -> float:
    """Eq. 1 in float64 numpy: mean_j s_j⁴ / (mean_j s_j²)², s_j = RMS over tokens."""
    s2 = (x.reshape(-1, x.shape[-1]).astype(np.float64) ** 2).mean(0)
    return float((s2**2).mean() / s2.mean() ** 2)


def residuals(model, batch_ids: torch.Tensor) -> dict[str, np.ndarray]:
    """Residual stream by hand: embedding output and each block's output (before ln_f)."""
    outs = {}
    hooks = [
        blk.register_forward_hook(
            lambda m, a, o, i=i: outs.__setitem__(
                f"blocks.{i}.resid_post", o[0] if isinstance(o, tuple) else o
            )
        )
        for i, blk in enumerate(model.transformer.h)
    ]
    try:
        with torch.no_grad():
            hs = model(batch_ids, output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    res = {"embed.resid_post": hs[0]}
    res.update(outs)
    return {k: v.double().numpy() for k, v in res.items()}


def n_hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_logs_at_exactly_the_measured_steps(tmp_path):
    model = tiny_gpt2()
    before = n_hooks(model)
    cb = OutlierCallback(every=2)
    trainer, _ = make_trainer(tmp_path, model, cb, steps=5)
    trainer.train()
    hist = trainer.state.log_history
    got = measured(hist)
    assert sorted(got) == [2, 4]
    for step, entry in got.items():
        assert "loss" in entry  # the same log row as the Trainer's own metrics
        assert entry["outliers/tokens"] == BATCH * SEQ
        for p in POINTS:
            for key in ("kurtosis", "mmr", "cos_sim"):
                assert np.isfinite(entry[f"outliers/{key}/{p}"]), (step, key, p)
        kurts = [entry[f"outliers/kurtosis/{p}"] for p in POINTS]
        assert entry["outliers/kurtosis_max"] == pytest.approx(max(kurts))
        assert entry["outliers/kurtosis_mean"] == pytest.approx(np.mean(kurts))
        assert min(kurts) >= 1.0 and max(kurts) < 10  # random init: no outliers
    # steps 1, 3, 5 are logged (logging_steps=1) but carry no outlier metrics
    assert {e["step"] for e in hist if "loss" in e} == {1, 2, 3, 4, 5}
    assert n_hooks(model) == before  # hooks removed at on_train_end


def test_gradient_accumulation_measures_every_micro_batch_of_the_step(tmp_path):
    model = tiny_gpt2()
    accum, steps = 3, 2
    cb = OutlierCallback(every=2, per_layer=True)
    # lr = 0: weights never change, so step 2's values can be recomputed by hand afterwards
    trainer, data = make_trainer(
        tmp_path, model, cb, steps=steps, accum=accum, lr=0.0, logging_steps=5
    )
    trainer.train()
    got = measured(trainer.state.log_history)
    assert sorted(got) == [2]  # measured, and logged although off the logging_steps grid
    entry = got[2]
    assert entry["outliers/tokens"] == accum * BATCH * SEQ
    per = accum * BATCH
    ids = torch.stack([d["input_ids"] for d in data[per : 2 * per]])  # step 2's micro-batches
    model.eval()
    ref = residuals(model, ids)
    for p in POINTS:
        assert entry[f"outliers/kurtosis/{p}"] == pytest.approx(kurt64(ref[p]), rel=1e-4), p
    # one micro-batch alone gives a different value: the union really was measured
    alone = residuals(model, ids[:BATCH])
    assert kurt64(alone["blocks.1.resid_post"]) != pytest.approx(
        entry["outliers/kurtosis/blocks.1.resid_post"], rel=1e-4
    )


def test_gradient_checkpointing_recompute_is_not_measured_twice(tmp_path):
    # HF checkpoints a block's forward (not __call__), so the block's own hooks fire once but
    # those of modules inside it fire again in backward: measure one of those too.
    model = tiny_gpt2()
    attn = model.transformer.h[0].attn
    cb = OutlierCallback(every=1, points=["blocks.*.resid_post", "transformer.h.0.attn"])
    trainer, data = make_trainer(tmp_path, model, cb, steps=1, lr=0.0, checkpointing=True)
    calls, seen = [], {}
    h = attn.register_forward_hook(lambda *a: calls.append(1))
    trainer.train()
    h.remove()
    assert len(calls) == 2  # forward, then the recompute in backward
    res = cb.last_results
    assert list(res) == [*POINTS[1:], "transformer.h.0.attn"]
    assert all(r["tokens"] == BATCH * SEQ for r in res.values())
    h = attn.register_forward_hook(lambda m, a, o: seen.__setitem__("attn", o[0]))
    model.eval()
    ref = residuals(model, torch.stack([d["input_ids"] for d in data[:BATCH]]))
    h.remove()
    ref["transformer.h.0.attn"] = seen["attn"].double().numpy()
    for p, r in res.items():
        assert r["kurtosis"] == pytest.approx(kurt64(ref[p]), rel=1e-4), p


def test_alert_fires_once_on_a_planted_outlier(tmp_path, caplog):
    model = tiny_gpt2(planted=True)
    cb = OutlierCallback(every=1, alert_kurtosis=10.0)
    trainer, _ = make_trainer(tmp_path, model, cb, steps=4, lr=1e-4)
    with caplog.at_level(logging.WARNING, logger="outlierlab"):
        trainer.train()
    records = [r for r in caplog.records if r.name == "outlierlab"]
    assert len(records) == 1, [r.getMessage() for r in records]
    alert = cb.alert_fired
    assert alert is not None and alert.step == 1
    assert alert.point in ("blocks.0.resid_post", "blocks.1.resid_post")
    assert alert.kurtosis > 10 and alert.neurons[0] == PLANTED
    msg = records[0].getMessage()
    assert "step 1" in msg and alert.point in msg and f"[{PLANTED}" in msg
    kurts = measured(trainer.state.log_history)
    assert len(kurts) == 4 and all(e["outliers/kurtosis_max"] > 10 for e in kurts.values())


def test_alert_never_fires_on_a_clean_model(tmp_path, caplog):
    cb = OutlierCallback(every=1, alert_kurtosis=10.0)
    trainer, _ = make_trainer(tmp_path, tiny_gpt2(), cb, steps=4)
    with caplog.at_level(logging.WARNING, logger="outlierlab"):
        trainer.train()
    assert cb.alert_fired is None
    assert [r for r in caplog.records if r.name == "outlierlab"] == []
    assert len(measured(trainer.state.log_history)) == 4


def test_metrics_reach_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = OutlierCallback(every=2, per_layer=False)
    trainer, _ = make_trainer(tmp_path, tiny_gpt2(), cb, steps=4, report_to=["tensorboard"])
    trainer.train()
    runs = list((tmp_path / "out" / "runs").iterdir())
    acc = EventAccumulator(str(runs[0])).Reload()
    tags = acc.Tags()["scalars"]
    assert "train/outliers/kurtosis_max" in tags and "train/loss" in tags
    assert [e.step for e in acc.Scalars("train/outliers/kurtosis_max")] == [2, 4]


def test_without_attach_warns_that_reporters_missed_the_metrics(tmp_path, caplog):
    cb = OutlierCallback(every=2)
    trainer, _ = make_trainer(tmp_path, tiny_gpt2(), cb, steps=2, attach=False)
    trainer.args.report_to = ["tensorboard"]  # as if a reporter were installed before us
    with caplog.at_level(logging.WARNING, logger="outlierlab"):
        trainer.train()
    assert sorted(measured(trainer.state.log_history)) == [2]  # log_history still gets them
    assert any("attach(trainer)" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_bad_every_is_a_config_error(every):
    from outlierlab.errors import ConfigError

    with pytest.raises(ConfigError, match="every"):
        OutlierCallback(every=every)
