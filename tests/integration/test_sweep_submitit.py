"""`sweep --launcher submitit`: each pending point a submitit job, run here by submitit's local
executor (real job processes started by submitit, as on a SLURM node); the manifest,
skip-if-finished and the report work as with the local launcher; bad launcher parameters are
refused in one line before anything is made."""

from __future__ import annotations

import json
import os

import pytest
from test_train import make_corpus

from outlierlab.cli import main

pytest.importorskip("submitit")

GRID = """
name = "cluster"
preset = "tiny"
[base]
"data.source" = "{corpus}"
"model.n_layer" = 1
"model.d_model" = 16
"model.n_head" = 2
"model.seq_len" = 16
"train.steps" = 4
"train.batch_size" = 2
"train.log_every" = 2
"train.eval_every" = 4
"train.eval_windows" = 2
"train.ckpt_every" = 4
"log.kurtosis_every" = 2
[grid]
model = ["pre-ln", "op"]
[quant]
schemes = ["w8a8-tensor"]
args = ["--calib-batches", "1", "--batch-size", "2", "--eval-windows", "2",
        "--stats-windows", "1", "--quiet"]
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("submitit")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUTLIERLAB_CACHE", str(root / "cache"))
        grid = root / "cluster.toml"
        grid.write_text(GRID.format(corpus=make_corpus(root / "corpus", files=8)))
        out = root / "out"
        args = ["sweep", str(grid), "--out", str(out), "--threads", "1",
                "--launcher", "submitit", "--launcher-param", "cluster=local",
                "--launcher-param", "timeout_min=20"]
        rc = main(args)
        yield {"rc": rc, "out": out, "args": args}


def _status(run):
    return json.loads((run / "status.json").read_text())["status"]


@pytest.mark.slow
def test_submitit_jobs_train_quantise_and_write_the_manifest(swept):
    out = swept["out"]
    assert swept["rc"] == 0
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["launcher"] == "submitit"
    assert manifest["launcher_params"] == {"cluster": "local", "timeout_min": "20"}
    jobs = manifest["jobs"]
    assert sorted(jobs) == ["op", "pre-ln"] and len(set(jobs.values())) == 2
    assert {o["name"]: (o["status"], o["trained"], o["quantized"])
            for o in manifest["outcomes"]} == {
        "pre-ln": ("finished", True, ["w8a8-tensor"]), "op": ("finished", True, ["w8a8-tensor"])}
    for name in ("pre-ln", "op"):
        assert _status(out / name) == "finished"
        q = json.loads((out / name / "quant" / "w8a8-tensor.json").read_text())
        assert q["fp_ppl"] > 1
    cfg = json.loads((out / "op" / "config.json").read_text())
    assert cfg["model"]["block"] == "op" and cfg["train"]["steps"] == 4
    # each point ran in its own job process started by submitit, not in this one
    for job_id in jobs.values():
        log = (out / ".submitit" / job_id / f"{job_id}_0_log.out").read_text()
        assert "training (log:" in log
        assert str(os.getpid()) != job_id


@pytest.mark.slow
def test_second_submitit_sweep_submits_nothing_and_the_report_reads_it(swept, tmp_path, capsys):
    out = swept["out"]
    before = {r: (out / r / "status.json").stat().st_mtime_ns for r in ("pre-ln", "op")}
    assert main(swept["args"]) == 0
    printed = capsys.readouterr().out
    assert "0 trained, 2 already there" in printed and "submitted" not in printed
    assert {r: (out / r / "status.json").stat().st_mtime_ns for r in before} == before
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["jobs"] == {} and not any(o["trained"] for o in manifest["outcomes"])
    rep = tmp_path / "report"
    assert main(["report", str(out), "--out", str(rep)]) == 0
    md = (rep / "report.md").read_text()
    assert "| op | op |" in md and "w8a8-tensor ppl" in md


@pytest.mark.parametrize("extra, says", [
    (["--launcher-param", "partition"], "--launcher-param 'partition' is not allowed; allowed: "
     "KEY=VALUE"),
    (["--launcher-param", "cluster=local", "--launcher-param", "slurm_nope=1"],
     "Unknown argument 'nope' for executor 'slurm'"),
    (["--launcher-param", "cluster=local", "--launcher-param", "timeout_min=soon"],
     "--launcher-param timeout_min=soon is not allowed; allowed: an integer"),
    (["--launcher-param", "cluster=moon"], "doesn't know any executor named moon"),
])
def test_bad_launcher_params_are_refused_before_anything_runs(tmp_path, capsys, extra, says):
    grid = tmp_path / "g.toml"
    grid.write_text('preset = "tiny"\n[grid]\nmodel = ["pre-ln", "op"]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(grid), "--out", str(out), "--launcher", "submitit", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not out.exists()


def test_launcher_params_need_the_submitit_launcher(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text('preset = "tiny"\n[grid]\nmodel = ["pre-ln"]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(grid), "--out", str(out), "--launcher-param", "a=1"]) == 2
    assert "only with --launcher submitit" in capsys.readouterr().err
    assert not out.exists()
