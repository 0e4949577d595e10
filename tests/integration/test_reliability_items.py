"""Issue #20, reliability second pass: each numbered item of the issue is a test here (named
``test_item_N_...``). Real files on disk, the CLI called in-process (``cli.main``); the full-disk
tests use a real 400 KB tmpfs where this process is root and ``mount -t tmpfs`` works, and skip
otherwise (``test_lock_enospc_simulated`` raises ENOSPC from ``os.pwrite`` with monkeypatch, so
the clean-up path is checked everywhere)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from test_train import TINY, make_corpus

from outlierlab.cli import main
from outlierlab.errors import first_line
from outlierlab.loading import load_model
from outlierlab.run_folder import RunFolder
from run_fixtures import snapshot

FAST_Q = ["--calib-batches", "1", "--eval-windows", "2", "--stats-windows", "1", "--quiet"]


def cli(capsys, *argv: str) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, stderr)."""
    try:
        rc = main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().err.strip()


def one_line_error(capsys, *argv: str) -> str:
    rc, err = cli(capsys, *argv)
    assert rc == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run (9 metrics rows, checkpoints at 3, 6, 8) and its corpus/cache."""
    root = tmp_path_factory.mktemp("rel")
    corpus = make_corpus(root / "corpus", files=10)
    os.environ["OUTLIERLAB_CACHE"] = str(root / "cache")
    rc = main(["train", "--preset", "tiny", *TINY, f"data.source={corpus}", "train.steps=8",
               "train.ckpt_every=3", "train.log_every=1", "train.keep_ckpts=3", "--quiet",
               f"out={root / 'run'}"])
    assert rc == 0
    return root / "run"


@pytest.fixture
def run(trained, tmp_path, monkeypatch) -> Path:
    """A private copy of the finished run."""
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(trained.parent / "cache"))
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


# -- data loss and security --------------------------------------------------------------------

def test_item_1_lock_symlink_is_refused(run, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (run / ".lock").symlink_to(victim)
    before = snapshot(tmp_path)
    err = one_line_error(capsys, "train", "--resume", str(run), "--quiet")
    assert "is a symbolic link" in err and ".lock" in err
    assert victim.read_text() == "precious\n"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("name", ["status.json", "metrics.jsonl", "config.json"])
def test_item_1_no_file_is_written_through_a_link(run, tmp_path, name):
    """Any file of the run replaced by a symlink to the user's file: the run extends, the
    user's file keeps its bytes, and the run gets a regular file of its own."""
    victim = tmp_path / f"victim-{name}"
    shutil.move(run / name, victim)
    (run / name).symlink_to(victim)
    before = victim.read_bytes()
    assert main(["train", "--resume", str(run), "train.steps=10", "--quiet"]) == 0
    assert victim.read_bytes() == before
    assert not (run / name).is_symlink() and (run / name).is_file()
    assert RunFolder(run).status["step"] == 10


@pytest.mark.parametrize("bad_status", [False, True])
def test_item_2_new_run_refuses_a_folder_that_is_not_a_run(tmp_path, capsys, bad_status):
    d = tmp_path / "D"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"mine")
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    (d / "notes.txt").write_text("notes")
    if bad_status:
        (d / "status.json").write_text("[1]")
    before = snapshot(tmp_path)
    err = one_line_error(capsys, "train", "--preset", "tiny", "train.steps=2", f"out={d}")
    assert "is not empty and is not a run" in err and "metrics.jsonl" in err
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["deleted", "a file"])
def test_item_3_resume_without_checkpoint_keeps_the_finished_run(run, capsys, how):
    shutil.rmtree(run / "checkpoints")
    if how == "a file":
        (run / "checkpoints").write_text("x")
    before = snapshot(run)
    err = one_line_error(capsys, "train", "--resume", str(run), "--quiet")
    assert f"cannot resume {run}" in err
    assert snapshot(run) == before  # the model and the 9 metrics rows are kept
    assert len(RunFolder(run).metrics) == 9


def _edit_state(run: Path, **changes) -> Path:
    folder = RunFolder(run).latest_checkpoint
    state = json.loads((folder / "state.json").read_text())
    for k, v in changes.items():
        if v is None:
            state.pop(k)
        else:
            state[k] = v
    (folder / "state.json").write_text(json.dumps(state))
    return folder


def test_item_4_failed_resume_keeps_status_and_quantize_works(run, capsys):
    _edit_state(run, rng=None)
    err = one_line_error(capsys, "train", "--resume", str(run), "train.steps=12", "--quiet")
    assert "rng is missing" in err
    status = RunFolder(run).status
    assert status["status"] == "finished"  # not "crashed"
    assert "rng" in status["resume_failed"]["message"]
    rc, err = cli(capsys, "quantize", str(run), "--no-save", *FAST_Q)
    assert rc == 0, err


@pytest.mark.parametrize(("changes", "needle"), [
    ({"rng": None}, "rng is missing"),
    ({"step": "six"}, "step is 'six'"),
    ({"step": 1e30}, "step is 1e+30"),
    ({"step": 10**30}, "≤ 1000000000"),
    ({"sampler": None}, "sampler is missing"),
    ({"rng": [{"torch": "!!", "numpy": [], "python": []}]}, "cannot restore"),
])
def test_item_9_and_12_bad_checkpoint_state_is_one_line(run, capsys, changes, needle):
    _edit_state(run, **changes)
    err = one_line_error(capsys, "train", "--resume", str(run), "train.steps=12", "--quiet")
    assert needle in err, err
    assert RunFolder(run).status["status"] == "finished"


def _mount_tmpfs(where: Path, size: str = "400k") -> None:
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs root to mount a tmpfs")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.fixture
def small_disk(tmp_path):
    """A real 400 KB tmpfs (root only; skipped elsewhere)."""
    d = tmp_path / "disk"
    _mount_tmpfs(d)
    yield d
    subprocess.run(["umount", "-l", str(d)], check=False)


def _fill(disk: Path) -> None:
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        while True:
            os.write(fd, b"\0" * 1024)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def _debris(folder: Path) -> list[str]:
    """Temporary files, empty locks, half-written folders and empty files left in ``folder``."""
    out = []
    for p in folder.rglob("*"):
        if ".tmp-" in p.name or p.name.startswith(".old-step") or (
                p.is_file() and p.stat().st_size == 0 and p.name != "filler"):
            out.append(str(p.relative_to(folder)))
    return out


def test_item_5_6_train_on_a_full_disk(small_disk, trained, capsys, monkeypatch):
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(trained.parent / "cache"))
    out = small_disk / "run"
    err = one_line_error(capsys, "train", "--preset", "tiny", *TINY, "model.d_model=64",
                         f"data.source={trained.parent / 'corpus'}", "train.steps=4",
                         "train.ckpt_every=1", "--quiet", f"out={out}")
    assert "no space left on the device" in err
    assert _debris(small_disk) == []
    assert not (out / ".lock").exists()


def test_item_5_6_lock_on_a_full_disk(small_disk, run, capsys):
    target = small_disk / "run"
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("*.safetensors", "optim.pt"))
    _fill(small_disk)
    err = one_line_error(capsys, "train", "--resume", str(target), "--quiet")
    assert "no space left" in err
    assert _debris(small_disk) == [] and not (target / ".lock").exists()


@pytest.mark.parametrize("command", ["report", "measure", "quantize", "quantize-save", "price"])
def test_item_5_6_outputs_on_a_full_disk(small_disk, run, capsys, command):
    args = {"report": ["report", str(run), "--out", str(small_disk / "rep")],
            "measure": ["measure", str(run), "--json", str(small_disk / "m.json")],
            "quantize": ["quantize", str(run), *FAST_Q, "--no-save", "--json",
                         str(small_disk / "q" / ("x" * 200) / "q.json")],
            "quantize-save": ["quantize", str(small_disk / "run"), *FAST_Q],
            "price": ["price", str(run), "--out", str(small_disk / "price"), "--eval-windows",
                      "1", "--stats-windows", "1", "--calib-batches", "1", "--seq-len", "16",
                      "--quiet"]}[command]
    if command == "quantize-save":  # the run itself on the full disk: saving into RUN/quant/
        shutil.copytree(run, small_disk / "run", ignore=shutil.ignore_patterns(
            "checkpoints", "metrics.jsonl"))
    _fill(small_disk)
    err = one_line_error(capsys, *args)
    assert "no space left" in err
    assert _debris(small_disk) == []


def test_lock_enospc_simulated(tmp_path, monkeypatch):
    """Simulated (monkeypatch): ``os.pwrite`` raising ENOSPC; the lock file and the folder it
    created are removed and the error names the lock file."""
    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    d = tmp_path / "new"
    with pytest.raises(OSError) as info:
        RunFolder(d).lock("test")
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(d / ".lock")
    assert not d.exists()


# -- tracebacks ---------------------------------------------------------------------------------

def test_item_7_nan_in_a_grid(tmp_path, capsys):
    g = tmp_path / "g.toml"
    g.write_text('preset = "tiny"\n[grid]\n"optim.lr" = [nan]\n')
    err = one_line_error(capsys, "sweep", str(g), "--dry-run", "--out", str(tmp_path / "o"))
    assert "optim.lr=nan is not allowed" in err
    assert not (tmp_path / "o").exists()


def test_item_8_non_utf8_names(tmp_path, capsys, cache_dir):
    corpus = make_corpus(tmp_path / "corpus", files=10)
    os.rename(corpus / "m0.py", os.fsencode(corpus) + b"/\xff\xfe.py")
    out = Path(os.fsdecode(os.fsencode(tmp_path) + b"/\xff\xfe"))
    rc = main(["train", "--preset", "tiny", *TINY, f"data.source={corpus}", "train.steps=4",
               "log.kurtosis_every=2", "train.log_every=2", "--quiet", f"out={out}"])
    assert rc == 0
    for argv in (["measure", str(out)], ["quantize", str(out), "--no-save", *FAST_Q],
                 ["report", str(out), "--out", str(tmp_path / "rep")]):
        rc, err = cli(capsys, *argv)
        assert rc == 0, (argv, err)
    assert (tmp_path / "rep" / "report.html").stat().st_size > 0
    assert (tmp_path / "rep" / "figures" / "kurtosis_vs_step.png").stat().st_size > 0


# -- wrong behaviour ----------------------------------------------------------------------------

def test_item_10_reading_a_checkpoint_rotated_away(run, monkeypatch):
    """The trainer rotates the checkpoint a reader picked (``RunFolder.retire_checkpoint``)
    between the pick and the read: the reader takes the next newest instead of failing."""
    rf = RunFolder(run)
    (run / "model.safetensors").unlink()  # a run being extended: readers use checkpoints
    real = RunFolder.newest_model
    calls = []

    def racing(self):
        picked = real(self)
        if not calls:
            rf.retire_checkpoint(picked[0])  # rotated away just after the pick
        calls.append(picked)
        return picked

    monkeypatch.setattr(RunFolder, "newest_model", racing)
    loaded = load_model(run)
    assert len(calls) == 2 and loaded.step == rf.checkpoint_list()[-1][0] == 6


@pytest.mark.slow
def test_item_10_reads_while_a_real_run_trains(trained, tmp_path, monkeypatch):
    """A real training process saving and rotating a checkpoint every step; 15 loads meanwhile
    all succeed."""
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(trained.parent / "cache"))
    out = tmp_path / "live"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "outlierlab", "train", "--preset", "tiny",
                             *TINY, f"data.source={trained.parent / 'corpus'}", "--quiet",
                             "train.steps=100000", "train.ckpt_every=1", "train.keep_ckpts=1",
                             f"out={out}"], env=env)
    try:
        t0 = time.monotonic()
        while RunFolder(out).latest_checkpoint is None:
            assert time.monotonic() - t0 < 120 and proc.poll() is None
            time.sleep(0.05)
        steps = {load_model(out).step for _ in range(15)}
        assert len(steps) >= 2  # really read while it moved on
    finally:
        proc.kill()
        proc.wait()


def test_item_11_quant_args_checked_before_training(tmp_path, capsys):
    for args, needle in ((["--bogus"], "unrecognized arguments: --bogus"),
                         (["--w-bits", "99"], "w_bits must be in 2..16, got 99")):
        g = tmp_path / "g.toml"
        g.write_text('preset = "tiny"\n[grid]\n"optim.lr" = [0.01]\n[quant]\nargs = '
                     + json.dumps(args) + "\n")
        err = one_line_error(capsys, "sweep", str(g), "--out", str(tmp_path / "o"))
        assert "quant.args" in err and needle in err
        assert not (tmp_path / "o").exists()


def test_item_12_huge_n_layer_in_model_config(run, capsys):
    mc = run / "model_config.json"
    meta = json.loads(mc.read_text())
    meta["config"]["n_layer"] = 2_000_000
    mc.write_text(json.dumps(meta))
    t0 = time.monotonic()
    err = one_line_error(capsys, "measure", str(run))
    assert "model.n_layer=2000000 is not allowed" in err and time.monotonic() - t0 < 20
    meta["config"]["n_layer"] = 1000
    mc.write_text(json.dumps(meta))
    err = one_line_error(capsys, "measure", str(run))
    assert "the file has 2 blocks" in err and time.monotonic() - t0 < 20


def test_item_12_million_point_grid_and_huge_steps(tmp_path, capsys):
    g = tmp_path / "g.toml"
    g.write_text('preset = "tiny"\n[grid]\n' + "".join(
        f'"train.seed" = {list(range(10))}\n'.replace("seed", f"seed{i}") for i in range(6)))
    t0 = time.monotonic()
    err = one_line_error(capsys, "sweep", str(g), "--dry-run")
    assert "1,000,000 points; allowed: at most 4,096" in err and time.monotonic() - t0 < 10
    err = one_line_error(capsys, "train", "--preset", "tiny", f"train.steps={10**26}",
                         f"out={tmp_path / 'r'}")
    assert "allowed: an integer in [1, 1000000000]" in err and not (tmp_path / "r").exists()


def test_item_13_save_and_no_save(run, tmp_path, capsys):
    x = tmp_path / "x.json"
    err = one_line_error(capsys, "quantize", str(run), "--save", str(x), "--no-save")
    assert "--save and --no-save" in err and not x.exists()


# -- unclear messages ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["measure", "quantize", "price"])
@pytest.mark.parametrize("dev", ["gpu", "cuda:x", "cuda:99"])
def test_item_14_bad_device_is_named(run, capsys, command, dev):
    err = one_line_error(capsys, command, str(run), "--device", dev)
    assert "argument --device" in err and "model.safetensors" not in err


def test_item_15_json_under_proc(run, capsys):
    err = one_line_error(capsys, "measure", str(run), "--json", "/proc/x.json")
    assert "argument --json: cannot write /proc/x.json: /proc is not writable" in err
    assert ".tmp" not in err


def test_item_16_latin1_data_and_symlink_loop(run, tmp_path, capsys):
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "a.txt").write_bytes("café crème\n".encode("latin-1") * 20)
    err = one_line_error(capsys, "measure", str(run), "--data", str(latin))
    assert "holds no non-empty UTF-8 documents (1 file(s) are not UTF-8" in err
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    err = one_line_error(capsys, "train", "--preset", "tiny", f"out={loop}")
    assert "already exists" not in err and "leads nowhere" in err


def test_item_16_no_raw_errno_in_messages(tmp_path):
    exc = FileExistsError(errno.EEXIST, "File exists", str(tmp_path))
    assert "[Errno" not in first_line(exc)


def test_item_16_hf_load_report_is_silenced(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["a b c d e"], trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    folder = tmp_path / "hf"
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=16, n_positions=32)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(folder)
    fast.save_pretrained(folder)
    meta = json.loads((folder / "config.json").read_text())
    meta["n_positions"] = 64  # weights no longer fit the config: transformers' MISMATCH report
    (folder / "config.json").write_text(json.dumps(meta))
    (tmp_path / "t.txt").write_text("a b c d e " * 200)
    capsys.readouterr()  # save_pretrained's own progress bar
    rc, err = cli(capsys, "measure", str(folder), "--data", str(tmp_path / "t.txt"))
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "MISMATCH" not in err and "Notes:" not in err and "above report" not in err
    assert "--verbose shows" in err
