"""`outlierlab reproduce`: sweep + quantise + report, printing where the report is. The runs
here are synthetic finished run folders (training is covered by test_sweep.py), so the test
checks the wiring: nothing is retrained and the report covers exactly the grid's runs."""

from __future__ import annotations

import json
from pathlib import Path

from outlierlab.cli import main
from run_fixtures import write_run

# [base] of the grids below: the settings write_run's synthetic runs record, so that they are
# the grid's points (a sweep refuses a folder holding runs of other settings)
FIXTURE_BASE = ('[base]\n"model.n_layer" = 4\n"model.d_model" = 64\n"model.n_head" = 4\n'
                '"optim.lr" = 1e-2\n"optim.eps" = 1e-12\n"train.batch_size" = 16\n'
                '"train.steps" = 100\n')


def test_reproduce_reports_the_grid_without_retraining(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text('name = "mini"\npreset = "tiny"\n' + FIXTURE_BASE
                    + '[grid]\nmodel = ["pre-ln", "op"]\n[quant]\nschemes = []\n')
    out = tmp_path / "out"
    write_run(out / "pre-ln", kurt=4.0, val_loss=1.70)
    write_run(out / "op", arch="op", kurt=1.6, val_loss=1.69)
    write_run(out / "stray", arch="op", kurt=9.0)  # not in the grid: not reported
    for name in ("pre-ln", "op", "stray"):
        for f in ("model.safetensors", "model_config.json"):  # "finished" needs final weights
            (out / name / f).write_bytes(b"")
    mtime = (out / "op" / "status.json").stat().st_mtime_ns

    assert main(["reproduce", "--preset", str(grid), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    html = out / "report" / "report.html"
    assert f"report: {html}" in printed
    # one seed: the direction is there, the verdict is indicative only
    assert "indicative only  The OP block has lower kurtosis" in printed
    assert "1 seed(s) per configuration: the verdicts are indicative only" in printed
    assert "0 trained, 2 already there" in printed
    assert (out / "op" / "status.json").stat().st_mtime_ns == mtime
    data = json.loads((out / "report" / "results.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["pre-ln", "op"]
    assert (out / "report" / "report.md").is_file()


def test_reproduce_unknown_preset_is_a_one_line_error(capsys):
    assert main(["reproduce", "--preset", "no-such"]) == 2
    err = capsys.readouterr().err.strip()
    assert "quick" in err and len(err.splitlines()) == 1


def _part(tmp_path, name, method):
    (tmp_path / f"{name}.toml").write_text(
        f'name = "{name}"\npreset = "tiny"\npart_of = "whole"\n{FIXTURE_BASE}'
        '[[include]]\nmodel = "pre-ln"\n"train.seed" = [0, 1]\n'
        f'[[include]]\n{method}\n"train.seed" = [0, 1]\n[quant]\nschemes = []\n')


def _finish(out, grid, kurt):
    """Synthetic finished runs for the grid's points not yet in ``out`` (what training
    would leave), Kurt by point name."""
    from outlierlab.experiments.grid import load_grid

    for p in load_grid(grid).points:
        d = out / p.name
        if d.exists():
            continue
        o = p.overrides
        extra = {k: v for k, v in o.items() if k.startswith("model.")}
        write_run(d, arch=o["model"], seed=o["train.seed"], extra=extra,
                  held_out=kurt[p.name.rsplit("-seed", 1)[0]] + 0.1 * o["train.seed"])
        for f in ("model.safetensors", "model_config.json"):
            (d / f).write_bytes(b"")


def test_a_split_grid_reports_one_leaderboard_from_both_parts(tmp_path, capsys, monkeypatch):
    """Issue 25: the parts of a grid share its folder (runs/<whole>), part 2 reuses part 1's
    baseline (same run names), a part's report covers every run there (one leaderboard from
    both parts), and the whole grid, run after its parts, has nothing left to do."""
    monkeypatch.chdir(tmp_path)
    _part(tmp_path, "attn", 'model = "pre-ln"\n"model.attn" = "softpick"')
    _part(tmp_path, "optim", 'model = "op"')
    (tmp_path / "whole.toml").write_text('parts = ["attn.toml", "optim.toml"]\n')
    out = tmp_path / "runs" / "whole"
    kurt = {"pre-ln": 6.0, "pre-ln-attnsoftpick": 3.0, "op": 1.5}

    _finish(out, tmp_path / "attn.toml", kurt)  # part 1, as training would leave it
    base = (out / "pre-ln-seed0" / "status.json").stat().st_mtime_ns
    assert main(["sweep", "attn.toml"]) == 0
    assert "sweep attn: 4 runs into runs/whole" in capsys.readouterr().out
    _finish(out, tmp_path / "optim.toml", kurt)  # part 2: only op is new
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("pre-ln-seed")) == [
        "pre-ln-seed0", "pre-ln-seed1"]
    assert main(["reproduce", "--preset", "optim.toml"]) == 0
    printed = capsys.readouterr().out
    assert "0 trained, 4 already there" in printed
    assert f"the report covers every run in {Path('runs/whole')}" in printed
    data = json.loads((out / "report" / "leaderboard.json").read_text())
    assert [(e["method"], e["seeds"]) for e in data["entries"]] == [
        ("op adamw", [0, 1]), ("pre-ln+softpick adamw", [0, 1]), ("pre-ln adamw", [0, 1])]
    soft = data["entries"][1]["vs_baseline"]["kurt_final"]
    assert (soft["seed_pairs"], soft["lower_in"]) == (2, 2)
    assert {p.name for p in out.glob("sweep*.json")} == {"sweep-attn.json", "sweep-optim.json"}

    assert main(["sweep", "whole.toml", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["#", "skip"]] * 6  # one baseline, reused
    assert (out / "pre-ln-seed0" / "status.json").stat().st_mtime_ns == base
