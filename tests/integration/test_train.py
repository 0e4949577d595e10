"""End-to-end training: every optimiser learns, metrics cadence, run folder contract,
divergence, bad overrides (in-process where possible, to keep the test budget)."""

from __future__ import annotations

import json
import math
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from outlierlab import config as C
from outlierlab.cli import main
from outlierlab.run_folder import RunFolder
from outlierlab.train import train

TINY = [
    "model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.seq_len=32",
    "train.batch_size=8", "train.eval_windows=8", "train.ckpt_every=0", "train.eval_every=0",
    "log.kurtosis_every=0",
]  # fmt: skip


def make_corpus(folder, files=40):
    """``files`` × ~2 kB of small, learnable Python-like files (no stdlib scan: fast, private)."""
    folder.mkdir(parents=True, exist_ok=True)
    r = random.Random(0)
    for k in range(files):
        lines = [f"def add_{r.randint(0, 99)}(x):\n    return x + {r.randint(0, 9)}\n"
                 for _ in range(60)]
        (folder / f"m{k}.py").write_text("\n".join(lines))
    return folder



@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def tiny_cfg(corpus, out, *extra):
    return C.load("tiny", overrides=[*TINY, f"data.source={corpus}", f"out={out}", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", ["adamw", "adafactor", "soap", "shampoo", "muon", "sgd"])
def test_loss_falls_with_each_optimiser(corpus, cache_dir, tmp_path, name):
    cfg = tiny_cfg(corpus, tmp_path / name, f"optim.name={name}", "train.steps=50",
                   "train.log_every=1")
    res = train(cfg, progress=False)
    assert res.status == "finished" and res.step == 50
    rows = RunFolder(tmp_path / name).metrics
    losses = [r["loss"] for r in rows if r["step"] > 0]
    assert len(losses) == 50
    # step 0 measures the batch step 1 trains on, before the update (no dropout: same loss)
    assert rows[0]["step"] == 0 and rows[0]["loss"] == pytest.approx(losses[0], rel=1e-5)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert first > math.log(257) - 0.5  # starts near uniform over the byte vocabulary
    assert last < 0.8 * first, (name, first, last)


def test_run_folder_and_metrics_cadence(corpus, cache_dir, tmp_path, capsys):
    out = tmp_path / "run"
    cfg = tiny_cfg(corpus, out, "train.steps=20", "train.log_every=5", "log.kurtosis_every=4",
                   "train.eval_every=10", "train.ckpt_every=8", "train.keep_ckpts=2")
    res = train(cfg)
    printed = capsys.readouterr().out
    assert "[model]" in printed and "step 20/20" in printed  # resolved config + plain lines
    rows = RunFolder(out).metrics
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps))
    assert {0, 4, 5, 8, 10, 12, 15, 16, 20} <= set(steps)
    for r in rows[1:]:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r)
        assert r["tokens"] == r["step"] * 8 * 32
    # step 0: before the first update, on the first training batch; Kurt at init is near 1
    zero = rows[0]
    assert zero["step"] == zero["tokens"] == 0 and {"loss", "val_loss", "kurtosis"} <= set(zero)
    assert 1.0 <= zero["kurtosis_mean"] < 1.5 and 1.0 <= zero["val_kurtosis_mean"] < 1.5
    kurt = {r["step"]: r for r in rows if "kurtosis" in r}
    assert sorted(kurt) == [0, 4, 8, 12, 16, 20]
    points = ["embed.resid_post", "blocks.0.resid_post", "blocks.1.resid_post"]
    for r in kurt.values():
        assert list(r["kurtosis"]) == points and list(r["mmr"]) == points
        assert all(1.0 <= v <= 32 for v in r["kurtosis"].values())  # 1 ≤ Kurt ≤ d (science §1)
        assert r["kurtosis_max"] == max(r["kurtosis"].values())
        assert math.isclose(r["kurtosis_mean"], sum(r["kurtosis"].values()) / 3)
    vals = {r["step"]: r for r in rows if "val_loss" in r}
    assert sorted(vals) == [0, 10, 20]
    # the held-out Kurt: the monitor over the validation windows, in the evaluation's forwards
    held = vals[20]
    assert list(held["val_kurtosis"]) == points
    assert held["val_kurtosis_max"] == max(held["val_kurtosis"].values())
    assert held["val_kurtosis_mean"] != kurt[20]["kurtosis_mean"]  # not the training batch
    assert math.isclose(vals[20]["val_ppl"], math.exp(vals[20]["val_loss"]), rel_tol=1e-6)
    assert res.val_loss == vals[20]["val_loss"] and res.kurtosis_mean == kurt[20]["kurtosis_mean"]

    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "finished" and status["step"] == 20
    assert status["data_fingerprint"]["files"] == 40
    saved = json.loads((out / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 257  # set from the tokenizer
    assert C.RunConfig.from_dict(saved).train.steps == 20
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-16", "step-20"]
    ck = out / "checkpoints" / "step-20"
    assert {"model.safetensors", "optim.pt", "state.json"} <= {p.name for p in ck.iterdir()}
    torch.load(ck / "optim.pt", weights_only=True)
    from outlierlab.model import GPT

    model = GPT.load(out)  # final weights at the run folder's root
    assert model.config.vocab_size == 257

    assert main(["runs", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "run" in table and "finished" in table and "20/20" in table


def test_divergence_stops_and_keeps_good_checkpoint(corpus, cache_dir, tmp_path, capsys):
    out = tmp_path / "div"
    args = ["train", "--preset", "tiny", *TINY, f"data.source={corpus}", f"out={out}",
            "optim.lr=1e6", "train.ckpt_every=1", "train.steps=30", "optim.warmup=0"]
    assert main(args) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "diverged" in err[0] and "at step" in err[0]
    status = json.loads((out / "status.json").read_text())
    assert status["status"] == "diverged"
    bad_step = int(status["message"].split("at step ")[1].split(";")[0])
    ckpts = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert ckpts and max(ckpts) == bad_step - 1 == status["step"]
    from outlierlab.model import GPT

    good = GPT.load(out / "checkpoints" / f"step-{max(ckpts)}")  # checksum intact
    assert all(torch.isfinite(p).all() for p in good.parameters())
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("optim.name=foo", "allowed: adafactor, adamw, muon, orthoadam, sgd, shampoo, soap"),
        ("model.n_head=7", "model.n_head=7"),
        ("train.steps=-1", "train.steps=-1"),
        ("model.heads=7", "did you mean model.n_head"),
    ],
)
def test_bad_overrides_exit_2_in_one_line(override, needle, capsys, tmp_path):
    assert main(["train", "--preset", "tiny", override, f"out={tmp_path}/x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("outlierlab train: error:") and needle in err[0]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_bad_override_real_process_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "outlierlab", "train", "model.n_head=7", "model.d_model=64"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "n_head" in proc.stderr


def test_existing_run_is_not_overwritten_and_maths_change_refused(corpus, cache_dir, tmp_path):
    out = tmp_path / "r"
    assert train(tiny_cfg(corpus, out, "train.steps=3"), progress=False).status == "finished"
    with pytest.raises(C.ConfigError, match="already holds a run"):
        train(tiny_cfg(corpus, out, "train.steps=3"), progress=False)
    with pytest.raises(C.ConfigError, match=r"optim\.lr differs"):
        train(C.resume_config(out, ["optim.lr=1e-2"]), resume=True, progress=False)
    res = train(C.resume_config(out, ["train.steps=5"]), resume=True, progress=False)
    assert res.status == "finished" and res.step == 5
    assert [r["step"] for r in RunFolder(out).metrics][-1] == 5


def test_tensorboard_events_and_missing_wandb(corpus, cache_dir, tmp_path, capsys):
    out = tmp_path / "tb"
    train(tiny_cfg(corpus, out, "train.steps=4", "train.log_every=2", "log.tensorboard=true",
                   "log.kurtosis_every=4"), progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ev = EventAccumulator(str(out / "tb"))
    ev.Reload()
    tags = ev.Tags()["scalars"]
    assert "loss" in tags and "kurtosis/blocks.1.resid_post" in tags
    assert [e.step for e in ev.Scalars("loss")] == [0, 2, 4]
    try:
        import wandb  # noqa: F401
    except ImportError:
        args = ["train", "--preset", "tiny", *TINY, f"data.source={corpus}", "log.wandb=true",
                f"out={tmp_path / 'wb'}"]
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install" in err[0] and "wandb" in err[0]
        assert not (tmp_path / "wb").exists()


@pytest.mark.slow
def test_bpe_run_folder_loads_for_measure(corpus, cache_dir, tmp_path):
    out = tmp_path / "bpe"
    res = train(tiny_cfg(corpus, out, "data.tokenizer=bpe", "data.vocab_size=300",
                         "train.steps=3", "train.ckpt_every=2"), progress=False)
    assert res.status == "finished"
    assert (out / "tokenizer.json").is_file()
    assert json.loads((out / "config.json").read_text())["model"]["vocab_size"] == 300
    from outlierlab.loading import load_model

    unfinished = tmp_path / "unfinished"  # the same run before its final save
    shutil.copytree(out, unfinished)
    (unfinished / "model.safetensors").unlink()
    (unfinished / "model_config.json").unlink()
    shutil.rmtree(unfinished / "checkpoints" / "step-3")
    step2 = unfinished / "checkpoints" / "step-2"  # a checkpoint passed directly
    for path in (out, unfinished, step2):  # finished: root weights; else checkpoints/step-2
        loaded = load_model(path)
        assert loaded.kind == "outlierlab" and loaded.tokenizer.vocab_size == 300
        ids = loaded.tokenizer.encode("def add_1(x):")
        assert loaded.logits(torch.tensor([ids])).shape == (1, len(ids), 300)


def test_every_row_key_is_in_the_schema_and_runs_agrees_with_report(corpus, cache_dir,
                                                                    tmp_path, capsys):
    """Every key the trainer, the monitor (and its held-out ``val_`` copies), the profile and
    TWEO write is defined in :mod:`outlierlab.metric_rows`; ``runs`` and ``report`` print the
    same final Kurt and say where it was measured."""
    from outlierlab.experiments.results import load_run
    from outlierlab.metric_rows import FIELDS, HELD_OUT, TRAIN_BATCH, unknown_fields

    out = tmp_path / "run"
    cfg = tiny_cfg(corpus, out, "train.steps=4", "train.log_every=1", "log.kurtosis_every=2",
                   "log.profile_every=2", "train.tweo_weight=0.01")
    assert train(cfg, progress=False).status == "finished"
    status = RunFolder(out).status  # the resolved device and precision, not "auto"
    assert (status["device"], status["precision"], status["world_size"]) == ("cpu", "fp32", 1)
    assert status["code"]["version"] and len(status["code"].get("git_commit", "x" * 40)) == 40
    rows = RunFolder(out).metrics
    assert [unknown_fields(r) for r in rows] == [[]] * len(rows)
    written = set().union(*rows)
    assert {"val_kurtosis_mean", "massive_max", "loss_penalty", "kurtosis"} <= written
    assert all(FIELDS[k].meaning for k in written)

    assert main(["runs", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.splitlines()[0])
    record = load_run(out)
    assert listed["kurtosis_from"] == record.final_kurt.source == HELD_OUT
    assert listed["final_kurtosis_mean"] == record.final_kurt_mean == rows[-1]["val_kurtosis_mean"]
    assert listed["final_kurtosis_max"] == record.final_kurt_max
    assert main(["report", str(out), "--out", str(tmp_path / "rep")]) == 0
    report = json.loads((tmp_path / "rep" / "results.json").read_text())["runs"][0]
    assert report["final_kurt_mean"] == listed["final_kurtosis_mean"]
    assert report["kurt_from"] == HELD_OUT
    capsys.readouterr()
    # without the held-out copy at the last step both fall back to the last training batch
    (out / "metrics.jsonl").write_text("".join(
        json.dumps({k: v for k, v in r.items() if not k.startswith("val_kurtosis")}) + "\n"
        for r in rows))
    assert main(["runs", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert listed["kurtosis_from"] == load_run(out).final_kurt.source == TRAIN_BATCH
    assert listed["final_kurtosis_mean"] == rows[-1]["kurtosis_mean"] == load_run(
        out).final_kurt_mean


def test_divergence_on_an_unread_step_is_found_at_the_next_read(corpus, cache_dir, tmp_path):
    """Steps that neither log nor checkpoint do not read their loss on the host (issue 24): a
    non-finite one is found at the next read step and named; no checkpoint is written after
    it and no final weights."""
    out = tmp_path / "div"
    cfg = tiny_cfg(corpus, out, "optim.lr=1e6", "optim.warmup=0", "train.steps=30",
                   "train.log_every=8", "train.sync_every=8", "train.ckpt_every=8")
    res = train(cfg, progress=False)
    assert res.status == "diverged"
    bad = int(res.message.split("at step ")[1].split(";")[0])
    assert "found at step 8" in res.message and 1 <= bad < 8
    assert res.step == bad - 1
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))
    assert not (out / "model.safetensors").exists()


def test_plain_steps_make_no_host_sync(corpus, cache_dir, tmp_path):
    """Issue 24: ``Trainer.run_step`` on a step that neither logs, evaluates, checkpoints,
    measures nor is a ``train.sync_every`` step reads nothing on the host; the others do."""
    from outlierlab.train import Trainer
    from outlierlab.train.syncs import SyncCounter

    cfg = tiny_cfg(corpus, tmp_path / "s", "train.steps=12", "train.log_every=6",
                   "train.sync_every=4", "log.kurtosis_every=5")
    counts = {}
    with Trainer(cfg, progress=False) as t:
        t.begin()
        while t.step < 12:
            with SyncCounter("cpu") as c:
                t.run_step()
            counts[t.step] = c.count
    reads = {4, 5, 6, 8, 10, 12}
    assert all(counts[s] == 0 for s in counts if s not in reads), counts
    assert all(counts[s] > 0 for s in reads), counts
    rows = RunFolder(tmp_path / "s").metrics
    assert [r["step"] for r in rows] == [0, 5, 6, 10, 12]


def test_validation_windows_across_documents(corpus, cache_dir, tmp_path):
    """``train.eval_docs``: the trainer's validation windows are
    :func:`~outlierlab.data.document_windows` of the validation split, one document each here;
    0 keeps the first consecutive windows."""
    from outlierlab.data import document_starts, document_windows, validation_windows
    from outlierlab.train.trainer import Trainer

    cfg = tiny_cfg(corpus, tmp_path / "docs", "train.steps=1", "train.eval_windows=4",
                   "train.eval_docs=4", "data.val_fraction=0.2")
    with Trainer(cfg, progress=False) as t:
        val, eot = t.data.val, t.data.tokenizer.eot_id
        want = document_windows(val, cfg.model.seq_len, 4, 4, eot)
        assert all(torch.equal(a, b) for a, b in zip(t.val, want))
        starts = document_starts(val, eot)
        first = [int(np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(
            val, cfg.model.seq_len) == row, axis=1))[0]) for row in t.val[0].numpy()]
        assert len(set(np.searchsorted(starts, first, side="right"))) == 4  # 4 documents
    plain = tiny_cfg(corpus, tmp_path / "plain", "train.steps=1", "train.eval_windows=4")
    with Trainer(plain, progress=False) as t:
        want = validation_windows(t.data.val, plain.model.seq_len, 4)
        assert all(torch.equal(a, b) for a, b in zip(t.val, want))
