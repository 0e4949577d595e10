"""A run folder is owned by one process (a real `outlierlab train` process holds it; a second
train, a resume and a quantise in this process are refused), an extended run's
old final model is not used, a changed corpus is not resumed silently, a sweep names a locked
run."""

from __future__ import annotations

import json
import signal

import pytest
from test_train import TINY, make_corpus
from test_train_faults import launch, wait_for

from outlierlab import config as C
from outlierlab.cli import main
from outlierlab.loading import load_model
from outlierlab.run_folder import RunFolder
from outlierlab.train import train
from run_fixtures import hold_lock


@pytest.mark.slow
def test_second_train_on_a_running_folder_is_refused_and_a_killed_holder_blocks_nothing(
        tmp_path, cache_dir, capsys):
    corpus = make_corpus(tmp_path / "corpus", files=20)
    out = tmp_path / "D"
    common = ["--preset", "tiny", *TINY, f"data.source={corpus}", "--quiet"]
    a = launch([*common, "train.steps=100000", "train.ckpt_every=2", "train.log_every=1",
                f"out={out}"])
    run = RunFolder(out)
    try:
        wait_for(lambda: run.latest_checkpoint is not None, a)
        config_before = run.config_file.read_bytes()
        for args in ([*common, "train.steps=40", "model.n_layer=3", f"out={out}"],
                     ["--resume", str(out), "--quiet"]):
            assert main(["train", *args]) == 2  # in this process: the lock is per process
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1, err
            assert err[0].startswith(f"outlierlab train: error: {out} is in use by pid {a.pid} "
                                     "(outlierlab train, started ")
        assert main(["quantize", str(out), "--quiet"]) == 2
        assert f"in use by pid {a.pid}" in capsys.readouterr().err
        assert run.config_file.read_bytes() == config_before  # B touched nothing
        assert a.poll() is None  # A still training
    finally:
        a.send_signal(signal.SIGKILL)
        a.wait()
    assert json.loads(run.lock_file.read_text())["pid"] == a.pid  # the stale lock is left
    n = run.status["step"]
    res = train(C.resume_config(out, [f"train.steps={n + 2}"]), resume=True, progress=False)
    assert res.status == "finished" and res.step == n + 2  # taken over at once
    assert not run.lock_file.exists()


@pytest.mark.slow
def test_extending_a_finished_run_drops_its_stale_final_model(tmp_path, cache_dir, capsys):
    corpus = make_corpus(tmp_path / "corpus", files=20)
    out = tmp_path / "D"
    common = [*TINY, f"data.source={corpus}", "train.ckpt_every=2", "train.log_every=1"]
    train(C.load("tiny", overrides=[*common, "train.steps=4", f"out={out}"]), progress=False)
    run = RunFolder(out)
    assert run.final_model == out and load_model(out).step == 4
    ext = launch(["--resume", str(out), "train.steps=100000", "--quiet"])
    try:
        wait_for(lambda: (run.latest_checkpoint or out).name not in ("step-4", out.name), ext)
    finally:
        ext.send_signal(signal.SIGKILL)
        ext.wait()
    assert run.final_model is None  # removed when the extension started
    loaded = load_model(out)
    newest = run.checkpoint_list()[-1][0]
    assert newest > 4 and loaded.step == newest
    assert loaded.describe() == f"loaded {out} at step {newest} (checkpoints/step-{newest})"
    assert main(["measure", str(out), "--max-tokens", "64", "--seq-len", "32"]) == 0
    assert f"at step {newest} (checkpoints/step-{newest})" in capsys.readouterr().out


def test_resume_after_the_corpus_changed_needs_allow_data_change(tmp_path, cache_dir, capsys):
    corpus = make_corpus(tmp_path / "corpus", files=10)
    out = tmp_path / "D"
    base = ["train", "--preset", "tiny", *TINY, f"data.source={corpus}", "--quiet"]
    assert main([*base, "train.steps=2", f"out={out}"]) == 0
    first = RunFolder(out).status["data_fingerprint"]
    (corpus / "new.py").write_text("def more(x):\n    return x\n" * 50)
    assert main(["train", "--resume", str(out), "train.steps=3", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data changed" in err[0] and "--allow-data-change" in err[0]
    assert RunFolder(out).status["data_fingerprint"] == first  # not overwritten
    assert main(["train", "--resume", str(out), "train.steps=3", "--quiet",
                 "--allow-data-change"]) == 0
    st = RunFolder(out).status
    assert st["status"] == "finished" and st["data_fingerprint"] != first
    assert st["data_history"] == [{"until_step": 2, "fingerprint": first}]
    assert main([*base[:1], "--allow-data-change", *base[1:], f"out={tmp_path / 'E'}"]) == 2


def test_sweep_names_a_locked_run(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text('name = "mini"\npreset = "tiny"\n[grid]\nmodel = ["op"]\n'
                    '[quant]\nschemes = []\n')
    out = tmp_path / "out"
    holder = hold_lock(out / "op")
    try:
        assert main(["sweep", str(grid), "--out", str(out)]) != 0
    finally:
        holder.kill()
        holder.wait()
    printed = capsys.readouterr().out
    assert f"op: skipped: in use by pid {holder.pid} (outlierlab test-holder)" in printed
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["outcomes"][0]["status"] == "in use"
