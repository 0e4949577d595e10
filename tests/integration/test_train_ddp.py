"""DDP on CPU (gloo): 2 ranks × batch B = 1 process × batch B × grad_accum 2, step by step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file
from test_train import TINY, make_corpus

from outlierlab import config as C
from outlierlab.run_folder import RunFolder
from outlierlab.train import train

MONITOR_FIELDS = {"kurtosis", "mmr", "cos_sim", "kurtosis_authors", "corr_authors",
                  "kurtosis_mean", "kurtosis_max", "attn_entropy", "attn_entropy_min"}


@pytest.mark.slow
def test_two_ranks_match_one_process_with_accumulation(tmp_path, cache_dir):
    corpus = make_corpus(tmp_path / "corpus")
    common = [*TINY, f"data.source={corpus}", "train.batch_size=4", "train.steps=12",
              "train.log_every=1", "log.kurtosis_every=6", "train.eval_every=6",
              "train.ckpt_every=6"]
    ddp = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "outlierlab", "train", "--preset", "tiny", *common, f"out={ddp}"],
        capture_output=True, text=True, env=env, timeout=240,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("step 12/12") == 1  # only rank 0 prints

    one = tmp_path / "one"
    train(C.load("tiny", overrides=[*common, "train.grad_accum=2", f"out={one}"]), progress=False)

    a, b = RunFolder(one).metrics, RunFolder(ddp).metrics
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(0, 13))
    assert a[1]["tokens"] == b[1]["tokens"] == 2 * 4 * 32  # global batch × seq_len
    for ra, rb in zip(a, b):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5, abs=1e-6)
        if ra["step"]:  # step 0 has no update, so no gradient
            assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-4, abs=1e-6)
        if "val_loss" in ra:
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=1e-5)
        # every logged monitor field, training (all-reduced over both ranks' micro-batches) and
        # held-out (val_*): subsamples are numbered by global micro-batch / evaluation group,
        # so MMR, cos-sim and attention entropy match too, not only Kurt
        fields = [k for k in ra if k.removeprefix("val_") in MONITOR_FIELDS]
        if ra["step"] in (6, 12):
            assert {"kurtosis", "mmr", "cos_sim", "attn_entropy", "val_mmr"} <= set(fields)
        assert set(fields) == {k for k in rb if k.removeprefix("val_") in MONITOR_FIELDS}
        for key in fields:
            va, vb = ra[key], rb[key]
            if isinstance(va, dict):
                assert va.keys() == vb.keys(), key
                for k, v in va.items():
                    assert vb[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (key, k)
            else:
                assert vb == pytest.approx(va, rel=1e-4, abs=1e-6), key
    wa, wb = load_file(one / "model.safetensors"), load_file(ddp / "model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
    assert sorted(p.name for p in (ddp / "checkpoints").iterdir()) == ["step-12", "step-6"]
