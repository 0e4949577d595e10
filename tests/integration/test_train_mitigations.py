"""`outlierlab train` with the published mitigations (docs/mitigations.md) composed in one
run: it trains, logs TWEO's `loss_penalty` beside the cross-entropy, measures attention entropy
with the configured weights, and a resumed OrthoAdam run (bases redrawn, not saved) continues
exactly as an uninterrupted one."""

from __future__ import annotations

import math

import pytest

from outlierlab import config as C
from outlierlab.run_folder import RunFolder
from outlierlab.train import Callback, train

ALL = [
    "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.seq_len=32",
    "train.batch_size=8", "train.eval_windows=2", "train.ckpt_every=0", "train.eval_every=0",
    "model.attn=softpick", "model.attn_gate=elem", "model.attn_bias_kv=true",
    "model.norm=ssnorm", "model.embed_proj=true", "optim.name=orthoadam",
    "train.tweo_weight=0.01", "train.log_every=2", "log.kurtosis_every=4",
]  # fmt: skip


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for k in range(8):
        (folder / f"m{k}.py").write_text("".join(f"def f{i}(x):\n    return x + {i % 7}\n"
                                                 for i in range(80)))
    return folder


@pytest.mark.slow
def test_every_mitigation_in_one_run_and_resume(corpus, cache_dir, tmp_path):
    straight = tmp_path / "straight"
    res = train(C.load("tiny", overrides=[*ALL, f"data.source={corpus}", f"out={straight}",
                                          "train.steps=8"]), progress=False)
    assert res.status == "finished" and math.isfinite(res.loss)
    rows = RunFolder(straight).metrics
    trained = [r for r in rows if r["step"] > 0]
    assert [r["step"] for r in trained] == [2, 4, 6, 8]
    assert all(r["loss_penalty"] > 0 and math.isfinite(r["loss"]) for r in trained)
    assert "loss_penalty" not in rows[0]  # step 0: no update, no penalty
    entropy = [r for r in trained if "attn_entropy" in r]
    assert entropy and all(0 < v < math.log(32) for r in entropy
                           for v in r["attn_entropy"].values())
    # stopped at 4 (as by SIGTERM), resumed to 8: the same numbers as the uninterrupted run

    class StopAt4(Callback):
        def on_step_end(self, trainer, step, row):
            if step == 4:
                trainer.stop.requested = "test"

    part = tmp_path / "part"
    cfg = C.load("tiny", overrides=[*ALL, f"data.source={corpus}", f"out={part}",
                                    "train.steps=8"])
    assert train(cfg, callbacks=[StopAt4()], progress=False).status == "interrupted"
    res2 = train(C.resume_config(part), resume=True, progress=False)
    assert res2.step == 8 and res2.status == "finished"
    again = {r["step"]: r for r in RunFolder(part).metrics}
    for r in trained:
        assert again[r["step"]]["loss"] == pytest.approx(r["loss"], rel=1e-6), r["step"]
        assert again[r["step"]]["loss_penalty"] == pytest.approx(r["loss_penalty"], rel=1e-5)
