"""Bad config input is one line and exit 2, before any run folder is touched (issue 16 items 3
and 4): non-finite values, unavailable or malformed devices, unreadable --config, config.json and
grid files, out-of-range --workers/--threads/--loss-tol, and sweep grids checked point by point
by the code ``train`` uses."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from outlierlab.cli import main


def error_line(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one line on stderr, which is returned."""
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(("override", "needles"), [
    ("optim.warmup=inf", ["optim.warmup=inf", "finite number ≥ 0"]),
    ("optim.eps=inf", ["optim.eps=inf", "finite number ≥ 0"]),
    ("optim.lr=nan", ["optim.lr=nan", "> 0"]),
    ("optim.grad_clip=-1", ["optim.grad_clip=-1", "≥ 0"]),
    ("optim.betas=0.9,1.0", ["optim.betas=(0.9, 1.0)", "two numbers in [0, 1)"]),
    ("train.device=cuda:abc", ["train.device='cuda:abc'", "cuda:N"]),
    ("train.device=gpu", ["train.device='gpu'", "auto, cpu, cuda"]),
    ("train.threads=-1", ["train.threads=-1", "integer ≥ 0"]),
])
def test_bad_values_are_one_line_before_the_run_folder(capsys, tmp_path, override, needles):
    out = tmp_path / "run"
    err = error_line(capsys, ["train", "--preset", "tiny", override, f"out={out}"])
    assert all(n in err for n in needles), err
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_on_a_machine_without_it(capsys, tmp_path):
    out = tmp_path / "run"
    err = error_line(capsys, ["train", "--preset", "tiny", "train.device=cuda", f"out={out}"])
    assert "train.device='cuda' is not allowed; allowed: auto, cpu (no CUDA device" in err
    assert not out.exists()


def test_warmup_inf_from_a_real_process(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "outlierlab", "train", "--preset", "tiny",
                           "optim.warmup=inf", f"out={out}"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("outlierlab train: error: optim.warmup=inf is not allowed; "
                                   "allowed: a finite number ≥ 0")
    assert not out.exists()


def test_unreadable_config_files(capsys, tmp_path):
    binary = tmp_path / "bin.toml"
    binary.write_bytes(bytes(range(256)))
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    assert "not a UTF-8 text file" in error_line(capsys, ["train", "--config", str(binary)])
    assert "is a folder" in error_line(capsys, ["train", "--config", str(folder)])
    assert "does not exist" in error_line(capsys, ["train", "--config", str(tmp_path / "no")])


@pytest.mark.parametrize(("content", "needle"), [
    ('{"model": ', "not valid JSON"),
    (b"\xff\xfe\x00", "not a UTF-8 text file"),
    ('{"optim": 5}', "section 'optim' is 5, expected a table"),
    ("[1]", "expected a JSON object, found list"),
    ('{"train": {"steps": "many"}}', "train.steps='many' is not allowed"),
])
def test_corrupt_config_json_on_resume(capsys, tmp_path, content, needle):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "config.json"
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    err = error_line(capsys, ["train", "--resume", str(run)])
    assert needle in err and str(path) in err


@pytest.mark.parametrize(("argv", "needle"), [
    (["sweep", "quick", "--dry-run", "--workers", "0"], "--workers: '0' is not allowed; "
                                                        "allowed: an integer ≥ 1"),
    (["sweep", "quick", "--dry-run", "--threads", "0"], "--threads: '0' is not allowed"),
    (["reproduce", "--workers", "-2"], "--workers: '-2' is not allowed"),
    (["report", "r", "--out", "o", "--loss-tol", "-1"], "--loss-tol: '-1' is not allowed; "
                                                       "allowed: a finite number ≥ 0"),
    (["report", "r", "--out", "o", "--loss-tol", "nan"], "--loss-tol: 'nan' is not allowed"),
])
def test_option_ranges(capsys, argv, needle):
    assert needle in error_line(capsys, argv)


# ----------------------------------------------------------------------------- sweep grids

BASE = 'name = "g"\npreset = "tiny"\n'


@pytest.mark.parametrize(("grid", "needles"), [
    ('[grid]\nmodel = ["pre-ln", "nope"]\n', ["grid point nope:", "unknown model preset 'nope'"]),
    ('[grid]\n"train.stepz" = [1, 2]\n', ["grid point stepz1:", "unknown field 'train.stepz'",
                                          "did you mean train.steps"]),
    ('[grid]\n"train.steps" = [5, "many"]\n', ["grid point stepsmany:",
                                              "train.steps='many' is not allowed"]),
    ('[grid]\n"optim.name" = ["adamw", "adam"]\n', ["grid point adam:", "optim.name='adam'"]),
    ('[grid]\n"optim.lr" = [1e-3, -1.0]\n', ["grid point lr-1:", "optim.lr=-1.0"]),
    ('[grid]\nmodel = ["op"]\n[quant]\nschemes = ["w3a3"]\n',
     ["quant.schemes='w3a3' is not allowed", "w8a8-tensor"]),
])
def test_grids_are_checked_before_anything_runs(capsys, tmp_path, grid, needles):
    path = tmp_path / "g.toml"
    path.write_text(BASE + grid)
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        err = error_line(capsys, ["sweep", str(path), "--out", str(out), *extra])
        assert all(n in err for n in needles), err
        assert not out.exists()


def test_binary_or_folder_grid_file(capsys, tmp_path):
    binary = tmp_path / "g.toml"
    binary.write_bytes(bytes(range(256)))
    assert "grid file" in error_line(capsys, ["sweep", str(binary), "--dry-run"])
    folder = tmp_path / "dir.toml"
    folder.mkdir()
    assert "is a folder" in error_line(capsys, ["sweep", str(folder), "--dry-run"])


def test_a_valid_grid_still_dry_runs(capsys, tmp_path):
    path = tmp_path / "g.toml"
    path.write_text(BASE + '[grid]\n"optim.betas" = [[0.9, 0.95]]\n"optim.lr" = [1e-3]\n')
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "o")]) == 0
    assert "optim.betas=[0.9,0.95]" in capsys.readouterr().out


def test_saved_config_json_round_trips(tmp_path):
    from outlierlab import config

    cfg = config.load("tiny", overrides=["optim.name=sgd"])
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert config.resume_config(tmp_path).optim == cfg.optim


@pytest.mark.parametrize(("text", "needle"), [
    ("optim = 5\n", "optim=5 is not allowed; allowed: a table of optim fields"),
    ('model = "op"\n', "model='op' is not allowed; allowed: a table of model fields"),
    ("[train]\nsteps = [1]\n", "train.steps=[1] is not allowed; allowed: an integer"),
])
def test_config_file_sections_must_be_tables_of_typed_fields(capsys, tmp_path, text, needle):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert needle in error_line(capsys, ["train", "--config", str(path), "model=op"])
