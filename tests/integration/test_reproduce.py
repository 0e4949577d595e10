"""`outlierlab reproduce`: sweep + quantise + report, printing where the report is. The runs
here are synthetic finished run folders (training is covered by test_sweep.py), so the test
checks the wiring: nothing is retrained and the report covers exactly the grid's runs."""

from __future__ import annotations

import json

from outlierlab.cli import main
from run_fixtures import write_run


def test_reproduce_reports_the_grid_without_retraining(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text('name = "mini"\npreset = "tiny"\n[grid]\nmodel = ["pre-ln", "op"]\n'
                    '[quant]\nschemes = []\n')
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
