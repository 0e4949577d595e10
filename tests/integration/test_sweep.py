"""A micro grid end to end: sweep (real `outlierlab train` subprocesses) → quantise → report;
a second sweep trains nothing; an interrupted run is resumed; a diverged run is a result."""

from __future__ import annotations

import json
import time
from html.parser import HTMLParser

import pytest
from test_train import make_corpus

from outlierlab.cli import main
from outlierlab.experiments.grid import load_grid

GRID = """
name = "micro"
preset = "tiny"
[base]
"data.source" = "{corpus}"
"model.n_layer" = 3
"model.d_model" = 16
"model.n_head" = 2
"model.seq_len" = 32
"train.steps" = 6
"train.batch_size" = 4
"train.log_every" = 2
"train.eval_every" = 3
"train.eval_windows" = 4
"train.ckpt_every" = 3
"log.kurtosis_every" = 2
[grid]
model = ["pre-ln", "op"]
[[include]]
model = "pre-ln"
"optim.lr" = 1e6
[quant]
schemes = ["w8a8-tensor"]
args = ["--calib-batches", "2", "--batch-size", "4", "--eval-windows", "4",
        "--stats-windows", "2", "--quiet"]
[measure]
args = ["--max-tokens", "128"]
"""



@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The micro grid swept once (shared by the tests below, which only read or re-sweep)."""
    root = tmp_path_factory.mktemp("sweep")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OUTLIERLAB_CACHE", str(root / "cache"))
        grid = root / "micro.toml"
        grid.write_text(GRID.format(corpus=make_corpus(root / "corpus", files=20)))
        out = root / "out"
        args = ["sweep", str(grid), "--out", str(out), "--workers", "2", "--threads", "1"]
        rc = main(args)
        yield {"rc": rc, "grid": grid, "out": out, "args": args, "mp": mp}


def _status(run):
    return json.loads((run / "status.json").read_text())["status"]


@pytest.mark.slow
def test_sweep_trains_quantises_and_records_divergence(sweep, capsys):
    out = sweep["out"]
    assert sweep["rc"] == 0
    names = [p.name for p in load_grid(sweep["grid"]).points]
    assert names == ["pre-ln", "op", "pre-ln-lr1e6"]
    assert _status(out / "pre-ln") == "finished" and _status(out / "op") == "finished"
    assert _status(out / "pre-ln-lr1e6") == "diverged"  # a result, not a failure
    for name in ("pre-ln", "op"):
        q = json.loads((out / name / "quant" / "w8a8-tensor.json").read_text())
        assert q["fp_ppl"] > 1 and q["quant_ppl"] > 1
        assert "--resume" not in (out / name / "sweep.log").read_text()
    assert not (out / "pre-ln-lr1e6" / "quant").exists()
    for name in ("pre-ln", "op"):  # the [measure] table: measure --save after quantisation
        assert json.loads((out / name / "measure.json").read_text())
    assert not (out / "pre-ln-lr1e6" / "measure.json").exists()
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["threads"] == 1 and manifest["workers"] == 2
    assert {o["name"]: o["status"] for o in manifest["outcomes"]} == {
        "pre-ln": "finished", "op": "finished", "pre-ln-lr1e6": "diverged"}
    # the config each run trained with is the grid point's
    cfg = json.loads((out / "op" / "config.json").read_text())
    assert cfg["model"]["block"] == "op" and cfg["train"]["steps"] == 6


@pytest.mark.slow
def test_second_sweep_trains_nothing_then_resumes_an_interrupted_run(sweep, capsys):
    out = sweep["out"]
    runs = ["pre-ln", "op", "pre-ln-lr1e6"]
    before = {r: (out / r / "status.json").stat().st_mtime_ns for r in runs}
    quant_before = (out / "op" / "quant" / "w8a8-tensor.json").stat().st_mtime_ns
    measure_before = (out / "op" / "measure.json").stat().st_mtime_ns
    time.sleep(0.05)
    assert main(sweep["args"]) == 0
    printed = capsys.readouterr().out
    assert "0 trained, 3 already there" in printed
    assert {r: (out / r / "status.json").stat().st_mtime_ns for r in runs} == before
    assert (out / "op" / "quant" / "w8a8-tensor.json").stat().st_mtime_ns == quant_before
    assert (out / "op" / "measure.json").stat().st_mtime_ns == measure_before
    manifest = json.loads((out / "sweep.json").read_text())
    assert not any(o["trained"] or o["quantized"] for o in manifest["outcomes"])

    # interrupt "op" after its last checkpoint: no final weights, status interrupted
    (out / "op" / "model.safetensors").unlink()
    st = json.loads((out / "op" / "status.json").read_text())
    (out / "op" / "status.json").write_text(json.dumps({**st, "status": "interrupted"}))
    assert main(sweep["args"]) == 0
    assert "1 trained, 2 already there" in capsys.readouterr().out
    assert _status(out / "op") == "finished" and (out / "op" / "model.safetensors").is_file()
    log = (out / "op" / "sweep.log").read_text()
    assert f"train --resume {out / 'op'}" in log
    steps = [json.loads(line)["step"] for line in
             (out / "op" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "a resumed run must not repeat logged steps"
    # its quantisation is redone: the old result predates the new weights
    assert (out / "op" / "quant" / "w8a8-tensor.json").stat().st_mtime_ns > quant_before
    assert (out / "op" / "measure.json").stat().st_mtime_ns > measure_before


@pytest.mark.slow
def test_a_folder_holding_runs_of_other_settings_is_refused(sweep, tmp_path, capsys):
    """The grid changed (6 → 8 steps) but the run folders are named alike: the sweep refuses to
    take the old runs for the new points, exit 2, one line, nothing touched."""
    out = sweep["out"]
    changed = tmp_path / "micro.toml"
    changed.write_text(sweep["grid"].read_text().replace('"train.steps" = 6',
                                                         '"train.steps" = 8'))
    before = (out / "op" / "status.json").stat().st_mtime_ns
    assert main(["sweep", str(changed), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{out / 'pre-ln'} holds a run of other settings than the grid's point pre-ln: " \
        "train.steps: 6 ≠ 8 (and 2 more run(s)); allowed: an output folder" in err
    assert (out / "op" / "status.json").stat().st_mtime_ns == before


class _Text(HTMLParser):
    def __init__(self):
        super().__init__()
        self.parts = []

    def handle_data(self, data):
        self.parts.append(data)


@pytest.mark.slow
def test_report_of_the_sweep_names_every_run(sweep, tmp_path, capsys):
    out = sweep["out"]
    rep = tmp_path / "report"
    assert main(["report", str(out), "--out", str(rep)]) == 0
    p = _Text()
    p.feed((rep / "report.html").read_text())
    text = " ".join(p.parts)
    for name in ("pre-ln", "op", "pre-ln-lr1e6"):
        assert name in text
    assert "diverged" in text
    md = (rep / "report.md").read_text()
    assert "| op | op | adamw |" in md
    assert "w8a8-tensor ppl" in md
    assert (rep / "figures" / "kurtosis_vs_step.png").is_file()
    # issue 22: each finished run's predictor table (quantize --predictors), gathered
    assert "Which measurement predicts a block's quantisation damage, across runs" in md
    assert "| w8a8-tensor | output error when only this block is quantised | 2 |" in md
    assert (rep / "figures" / "predictors.png").is_file()


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text('preset = "tiny"\n[grid]\nmodel = ["pre-ln", "op"]\n')
    out = tmp_path / "out"
    assert main(["sweep", str(grid), "--dry-run", "--out", str(out)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[1].startswith(f"python -m outlierlab train --preset tiny model=op out={out}/op")
    assert "quantize" in lines[1] and "--scheme w8a8-dynamic --predictors" in lines[1]
    assert not out.exists()
    assert main(["sweep", str(tmp_path / "nope.toml")]) == 2
