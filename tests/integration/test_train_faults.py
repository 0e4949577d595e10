"""Faults: SIGKILL + resume is bit-exact on CPU; SIGTERM saves a checkpoint and exits 130."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from test_train import TINY, make_corpus

from outlierlab import config as C
from outlierlab.run_folder import RunFolder
from outlierlab.train import train


def launch(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "outlierlab", "train", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def wait_for(pred, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    t0 = time.monotonic()
    while not pred():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early ({proc.returncode}): {proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_exact(tmp_path, cache_dir):
    corpus = make_corpus(tmp_path / "corpus")
    common = [*TINY, f"data.source={corpus}", "train.steps=60", "train.ckpt_every=5",
              "train.log_every=1", "log.kurtosis_every=7", "train.eval_every=20"]
    killed = tmp_path / "killed"
    proc = launch(["--preset", "tiny", *common, f"out={killed}"])
    wait_for(lambda: any((killed / "checkpoints").glob("step-*/state.json")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    status = json.loads((killed / "status.json").read_text())
    assert status["status"] == "running" and status["step"] < 60  # really cut short

    ref = train(C.load("tiny", overrides=[*common, f"out={tmp_path / 'ref'}"]), progress=False)
    res = train(C.resume_config(killed), resume=True, progress=False)
    assert ref.status == res.status == "finished" and res.step == 60

    ref_dir = tmp_path / "ref"
    a, b = load_file(ref_dir / "model.safetensors"), load_file(killed / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights
    # (the files' bytes may differ only in the header: which name of the tied embedding /
    # lm-head pair safetensors stores depends on the process's string hashing)
    ra, rb = RunFolder(ref_dir).metrics, RunFolder(killed).metrics
    assert [(r["step"], r["loss"]) for r in ra] == [(r["step"], r["loss"]) for r in rb]
    assert [r.get("kurtosis") for r in ra] == [r.get("kurtosis") for r in rb]


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_exits_cleanly(tmp_path, cache_dir):
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "run"
    proc = launch(["--preset", "tiny", *TINY, f"data.source={corpus}", f"out={out}",
                   "train.steps=100000", "train.log_every=1"])
    wait_for(lambda: len(RunFolder(out).metrics) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(err.strip().splitlines()) == 1 and "interrupted" in err and "--resume" in err
    status = json.loads((out / "status.json").read_text())
    n = status["step"]
    assert status["status"] == "interrupted" and n >= 3
    assert (out / "checkpoints" / f"step-{n}" / "state.json").is_file()
    assert not (out / "model.safetensors").exists()
    res = train(C.resume_config(out, [f"train.steps={n + 2}"]), resume=True, progress=False)
    assert res.status == "finished" and res.step == n + 2
