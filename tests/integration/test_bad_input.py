"""The bad-input suite (issue #20, docs/reliability.md): every case runs ``outlierlab`` in-process
(``cli.main``) on real files and asserts exit 2, exactly one line on stderr containing the
expected words and no traceback, and that nothing in the workspace changed (a snapshot of every
file's bytes and every link before and after; the command's own output path, if any, must not
exist afterwards either). One tiny finished run is trained once for the module; each case works
on its own copy of the workspace."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from test_train import TINY, make_corpus

from outlierlab.cli import main
from run_fixtures import snapshot


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """The template workspace: ``run`` (finished tiny run), ``corpus``, ``cache``, ``file.txt``,
    ``empty/``, ``latin/`` (Latin-1 text only), ``bin.bin`` (bytes), grids and configs."""
    ws = tmp_path_factory.mktemp("bad")
    corpus = make_corpus(ws / "corpus", files=8)
    old = os.environ.get("OUTLIERLAB_CACHE")
    os.environ["OUTLIERLAB_CACHE"] = str(ws / "cache")
    try:
        assert main(["train", "--preset", "tiny", *TINY, f"data.source={corpus}",
                     "train.steps=4", "train.ckpt_every=2", "--quiet", f"out={ws / 'run'}"]) == 0
    finally:
        if old is None:
            os.environ.pop("OUTLIERLAB_CACHE")
        else:
            os.environ["OUTLIERLAB_CACHE"] = old
    (ws / "file.txt").write_text("hello\n")
    (ws / "empty").mkdir()
    (ws / "latin").mkdir()
    (ws / "latin" / "a.txt").write_bytes("café crème\n".encode("latin-1") * 20)
    (ws / "bin.bin").write_bytes(bytes(range(256)))
    (ws / "notrun").mkdir()
    (ws / "notrun" / "notes.txt").write_text("mine")
    (ws / "notrun" / "model.safetensors").write_bytes(b"mine")
    (ws / "loop").symlink_to(ws / "loop")
    (ws / "hf").mkdir()
    (ws / "hf" / "config.json").write_text('{"model_type": "gpt2"}')
    for name, text in GRIDS.items():
        (ws / f"{name}.toml").write_text(text)
    (ws / "notoml.toml").write_text("this is [ not toml")
    (ws / "unknown.toml").write_text("[train]\nstepz = 3\n")
    return ws


@pytest.fixture
def ws(base, tmp_path, monkeypatch) -> Path:
    dst = tmp_path / "ws"
    shutil.copytree(base, dst, symlinks=True)
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(dst / "cache"))
    return dst


GRIDS = {
    "g_nan": '[grid]\n"optim.lr" = [nan]\n',
    "g_inf": '[grid]\n"optim.eps" = [inf]\n',
    "g_field": '[grid]\n"train.stepz" = [1]\n',
    "g_model": '[grid]\nmodel = ["nope"]\n',
    "g_optim": '[grid]\n"optim.name" = ["nope"]\n',
    "g_type": '[grid]\n"train.steps" = ["many"]\n',
    "g_scheme": '[grid]\n"train.steps" = [2]\n[quant]\nschemes = ["w3a3"]\n',
    "g_qargs": '[grid]\n"train.steps" = [2]\n[quant]\nargs = ["--bogus"]\n',
    "g_wbits": '[grid]\n"train.steps" = [2]\n[quant]\nargs = ["--w-bits", "99"]\n',
    "g_abits": '[grid]\n"train.steps" = [2]\n[quant]\nargs = ["--a-bits", "1"]\n',
    "g_calib": '[grid]\n"train.steps" = [2]\n[quant]\nargs = ["--calib-batches", "0"]\n',
    "g_big": "[grid]\n" + "".join(f'"train.seed{i}" = {list(range(10))}\n' for i in range(6)),
    "g_empty": '[grid]\n"train.steps" = []\n',
    "g_out": '[grid]\nout = ["x"]\n',
    "g_topkey": 'bogus = 1\n[grid]\n"train.steps" = [2]\n',
    "g_workers": 'workers = 0\n[grid]\n"train.steps" = [2]\n',
}

# (argv with {ws}, words the one line must contain, the command's own output path or "")
CASES: list[tuple[str, str, str]] = []


def case(argv: str, needle: str, out: str = "") -> None:
    CASES.append((argv, needle, out))


# -- train: config values, checked before the run folder ----------------------------------------
for field, values in {
    "optim.lr": ["nan", "inf", "-1", "0", "abc"],
    "optim.eps": ["inf", "-1", "nan"],
    "optim.warmup": ["inf", "-1"],
    "optim.grad_clip": ["-1", "nan"],
    "optim.betas": ["0.9,1.0", "1.5,0.9"],
    "optim.name": ["nope", "1"],
    "train.steps": ["0", "-5", "2.5", "many", str(10**26), "1e30"],
    "train.batch_size": ["0", "-1", "x"],
    "train.grad_accum": ["0", "1.5"],
    "train.log_every": ["0"],
    "train.eval_windows": ["0"],
    "train.keep_ckpts": ["0"],
    "train.sync_every": ["0", "-1", "x"],
    "train.parallel": ["zero3", "1"],
    "train.ckpt_every": ["-1", str(10**12)],
    "train.eval_every": ["-1"],
    "train.threads": ["-1"],
    "train.seed": ["-1", "x"],
    "train.device": ["gpu", "cuda:abc", "tpu", "cuda"],
    "train.precision": ["fp8"],
    "model.n_layer": ["0", "2000000", "x"],
    "model.d_model": ["0", "7", str(10**9)],
    "model.n_head": ["0", "-2"],
    "model.seq_len": ["0", str(10**9)],
    "model.dropout": ["1.5", "-0.1"],
    "model.block": ["foo"],
    "model.norm": ["foo"],
    "model.activation": ["foo"],
    "model.heads": ["7"],
    "train.stepz": ["3"],
    "model": ["nope"],
}.items():
    for v in values:
        case(f"train --preset tiny {field}={v} out={{ws}}/new", field.split(".")[-1],
             "{ws}/new")

# -- train: where it writes, what it resumes -----------------------------------------------------
for argv, needle in [
    ("train --preset tiny out={ws}/notrun", "is not empty and is not a run"),
    ("train --preset tiny out={ws}/run", "already holds a run"),
    ("train --preset tiny out={ws}/hf", "is not empty and is not a run (it holds config.json)"),
    ("train --preset tiny out={ws}/cache", "is not empty and is not a run"),
    ("train --preset tiny out={ws}/corpus", "is not empty and is not a run"),
    ("train --preset tiny out={ws}", "is not empty and is not a run"),
    ("train --resume {ws}/hf", "not a run folder"),
    ("train --preset tiny out={ws}/file.txt", "file.txt"),
    ("train --preset tiny out={ws}/file.txt/x", "is a file, not a folder"),
    ("train --preset tiny out={ws}/loop", "leads nowhere"),
    ("train --preset tiny out=/proc/outlierlab-x", "/proc"),
    ("train --config {ws}/nofile.toml", "does not exist"),
    ("train --config {ws}/empty", "is a folder"),
    ("train --config {ws}/bin.bin", "not a UTF-8 text file"),
    ("train --config {ws}/notoml.toml", "not valid TOML"),
    ("train --config {ws}/unknown.toml out={ws}/new", "stepz"),
    ("train --preset nope out={ws}/new", "nope"),
    ("train --preset tiny --allow-data-change out={ws}/new", "--allow-data-change"),
    ("train --resume {ws}/run --preset tiny", "--resume uses the run's own config"),
    ("train --resume {ws}/nothere", "nothere"),
    ("train --resume {ws}/empty", "not a run folder"),
    ("train --resume {ws}/notrun", "not a run folder"),
    ("train --resume {ws}/file.txt", "file.txt"),
    ("train --resume {ws}/run model.n_layer=3", "model.n_layer differs"),
    ("train --resume {ws}/run optim.lr=0.5", "optim.lr differs"),
    ("train --resume {ws}/run train.steps=0", "train.steps=0"),
    ("train --resume {ws}/run train.steps=x", "train.steps"),
    ("train --resume {ws}/run out={ws}/other", "out"),
    ("train --preset tiny --bogus", "unrecognized arguments: --bogus"),
    ("train --preset tiny notanoverride", "notanoverride"),
]:
    case(argv, needle)

# -- output paths of measure / quantize / report / price / sweep ---------------------------------
for opt in ("measure {ws}/run --json", "quantize {ws}/run --json", "quantize {ws}/run --save"):
    for target, needle in [("{ws}/empty", "is a folder; give a file path"),
                           ("{ws}/file.txt/x.json", "is a file, not a folder"),
                           ("/proc/x.json", "/proc is not writable"),
                           ("{ws}/loop/x.json", "broken link")]:
        case(f"{opt} {target}", needle)
for opt in ("report {ws}/run --out", "price {ws}/run --out", "sweep g_nan --dry-run --out"):
    for target, needle in [("{ws}/file.txt", "is a file, not a folder"),
                           ("{ws}/file.txt/sub", "is a file, not a folder"),
                           ("/proc/rep", "/proc is not writable"),
                           ("{ws}/loop/sub", "broken link")]:
        case(f"{opt} {target}", needle)

# -- devices and counts ---------------------------------------------------------------------------
for cmd in ("measure", "quantize", "price"):
    for dev in ("gpu", "cuda:x", "cuda:99", "CPU", "cuda:-1"):
        case(f"{cmd} {{ws}}/run --device {dev}", "argument --device")
    for opt in ("--batch-size", "--seq-len"):
        for v in ("0", "-1", "x"):
            case(f"{cmd} {{ws}}/run {opt} {v}", f"argument {opt}")
for cmd in ("quantize", "price"):
    for opt in ("--calib-batches", "--eval-windows", "--stats-windows"):
        for v in ("0", "x"):
            case(f"{cmd} {{ws}}/run {opt} {v}", f"argument {opt}")
for opt, v, needle in [("--w-bits", "99", "w_bits"), ("--w-bits", "1", "w_bits"),
                       ("--a-bits", "99", "a_bits"), ("--w-bits", "x", "--w-bits"),
                       ("--scheme", "w3a3", "w3a3"), ("--w-granularity", "row", "row"),
                       ("--a-range", "max", "max"), ("--smooth", "x", "--smooth")]:
    case(f"quantize {{ws}}/run {opt} {v}", needle)
case("train --preset tiny train.parallel=fsdp optim.name=soap out={ws}/new",
     "optim.name=soap cannot train with train.parallel=fsdp", "{ws}/new")
case("quantize {ws}/run --save {ws}/q.json --no-save", "--save and --no-save")
for v in ("-1", "nan", "inf", "x"):
    case(f"report {{ws}}/run --out {{ws}}/rep --loss-tol {v}", "--loss-tol", "{ws}/rep")
for opt in ("--workers", "--threads"):
    for v in ("0", "-1", "x", "1.5"):
        case(f"sweep g_nan --dry-run {opt} {v}", f"argument {opt}")

# -- models that cannot be loaded -----------------------------------------------------------------
for cmd in ("measure", "quantize", "price"):
    for target, needle in [("{ws}/nothere", "does not exist"),
                           ("{ws}/file.txt", "not a folder"),
                           ("{ws}/empty", "holds no model"),
                           ("{ws}/notrun", "holds no model")]:
        case(f"{cmd} {target}", needle)

# -- --data that holds no text --------------------------------------------------------------------
for target, needle in [("{ws}/latin", "1 file(s) are not UTF-8"),
                       ("{ws}/empty", "holds no non-empty"), ("{ws}/nothere", "does not exist"),
                       ("{ws}/bin.bin", "is not UTF-8 text")]:
    case(f"measure {{ws}}/run --data {target}", needle)

# -- sweep grids -----------------------------------------------------------------------------------
for name, needle in [("g_nan", "optim.lr=nan"), ("g_inf", "optim.eps=inf"),
                     ("g_field", "stepz"), ("g_model", "nope"), ("g_optim", "nope"),
                     ("g_type", "train.steps"), ("g_scheme", "w3a3"),
                     ("g_qargs", "quant.args: unrecognized arguments: --bogus"),
                     ("g_wbits", "w_bits must be in 2..16, got 99"), ("g_abits", "a_bits"),
                     ("g_calib", "--calib-batches"), ("g_big", "1,000,000 points"),
                     ("g_empty", "empty list"), ("g_out", "'out' is set by the sweep"),
                     ("g_topkey", "unknown key 'bogus'"), ("g_workers", "workers")]:
    for dry in ("--dry-run", ""):
        case(f"sweep {{ws}}/{name}.toml {dry} --out {{ws}}/sw", needle, "{ws}/sw")
for target, needle in [("{ws}/bin.bin", "not a UTF-8 text file"),
                       ("{ws}/nofile.toml", "not found"), ("{ws}/notoml.toml", "not valid TOML"),
                       ("nopreset", "unknown sweep preset")]:
    case(f"sweep {target} --dry-run", needle)


def _argv(template: str, ws: Path) -> list[str]:
    text = template.replace("{ws}", str(ws))
    return [a.replace("g_nan", str(ws / "g_nan.toml")) if a == "g_nan" else a
            for a in text.split()]


@pytest.mark.parametrize(("template", "needle", "out"), CASES,
                         ids=[f"{i:03d}-{c[0].split()[0]}" for i, c in enumerate(CASES)])
def test_bad_input(ws, capsys, template, needle, out):
    before = snapshot(ws)
    try:
        rc = main(_argv(template, ws))
    except SystemExit as exc:  # argparse usage errors
        rc = exc.code
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert rc == 2, (rc, err, captured.out[-500:])
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err and err.startswith("outlierlab"), err
    assert needle in err, err
    assert snapshot(ws) == before  # nothing changed, the cache and the run included
    if out:
        assert not Path(out.replace("{ws}", str(ws))).exists()


def test_the_suite_is_large_enough():
    assert len(CASES) >= 200


def test_resume_with_a_broken_checkpoint_changes_only_a_note(ws, capsys):
    """A resume that fails on its checkpoint leaves the run's files as they were but for the
    ``resume_failed`` note in ``status.json``."""
    state = ws / "run" / "checkpoints" / "step-4" / "state.json"
    data = json.loads(state.read_text())
    data["step"] = "six"
    state.write_text(json.dumps(data))
    before = snapshot(ws)
    assert main(["train", "--resume", str(ws / "run"), "train.steps=8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step is 'six'" in err
    after = snapshot(ws)
    status = json.loads(after.pop("run/status.json")[1])
    before.pop("run/status.json")
    assert after == before and status["status"] == "finished" and "resume_failed" in status
