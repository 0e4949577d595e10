"""Unwritable outputs are one line and exit 2 (issue 16 item 2): a file where a folder should be,
a folder where a file should be, read-only and immutable folders, a cache dir that is a file.
Output options are refused when parsed, before any work starts."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess

import pytest

from outlierlab.cli import main
from outlierlab.errors import path_error


def one_line_exit_2(capsys, argv, *needles):
    """``main(argv)`` exits 2 (returned or raised by argparse) with one stderr line holding
    every needle."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert str(needle) in err, err
    return err


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    return f


def _run(*cmd: str) -> bool:
    if shutil.which(cmd[0]) is None:
        return False
    return subprocess.run(cmd, capture_output=True).returncode == 0


LOCKS = {  # root ignores file modes: a read-only bind mount, or the immutable flag
    "ro-bind": (("mount", "--bind", "-o", "ro", "{d}", "{d}"), ("umount", "{d}")),
    "immutable": (("chattr", "+i", "{d}"), ("chattr", "-i", "{d}")),
}


@pytest.fixture(params=sorted(LOCKS))
def readonly_dir(request, tmp_path):
    """An existing folder nobody can write to: chmod 555 for a normal user; as root a read-only
    bind mount or the immutable flag (each a case), skipped where it does not work."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    lock, unlock = ([a.format(d=d) for a in cmd] for cmd in LOCKS[request.param])
    if not _run(*lock):
        pytest.skip(f"as root, and `{' '.join(lock)}` fails here: no folder root cannot write")
    try:
        yield d
    finally:
        _run(*unlock)


OUTPUT_OPTIONS = [
    ["measure", "MODEL", "--json"],
    ["quantize", "MODEL", "--json"],
    ["quantize", "MODEL", "--save"],
    ["report", "RUN", "--out"],
    ["reproduce", "--out"],
    ["sweep", "quick", "--dry-run", "--out"],
]


@pytest.mark.parametrize("argv", OUTPUT_OPTIONS, ids=lambda a: " ".join(a[::2]))
def test_output_option_under_a_file(argv, a_file, capsys):
    target = a_file / "out.json"
    one_line_exit_2(capsys, [*argv, str(target)], argv[-1], target, f"{a_file} is a file")


@pytest.mark.parametrize("argv", OUTPUT_OPTIONS, ids=lambda a: " ".join(a[::2]))
def test_output_option_in_a_readonly_folder(argv, readonly_dir, capsys):
    target = readonly_dir / "out"
    one_line_exit_2(capsys, [*argv, str(target)], target, "not writable")


@pytest.mark.parametrize("argv", OUTPUT_OPTIONS[:3], ids=lambda a: " ".join(a[::2]))
def test_file_option_given_a_folder(argv, tmp_path, capsys):
    one_line_exit_2(capsys, [*argv, str(tmp_path)], tmp_path, "is a folder")


def test_folder_option_given_a_file(a_file, capsys):
    one_line_exit_2(capsys, ["report", "RUN", "--out", str(a_file)], a_file, "is a file")


@pytest.mark.parametrize("where", ["file", "under-file", "etc-hosts"])
def test_train_out_that_is_or_is_under_a_file(where, a_file, cache_dir, capsys):
    out = {"file": a_file, "under-file": a_file / "run", "etc-hosts": "/etc/hosts"}[where]
    if where == "etc-hosts" and not os.path.isfile(out):
        pytest.skip("no /etc/hosts here")
    blocker = "/etc/hosts" if where == "etc-hosts" else a_file
    argv = ["train", "--preset", "tiny", "train.steps=1", f"out={out}", "--quiet"]
    one_line_exit_2(capsys, argv, out, f"{blocker} is a file, not a folder")


def test_train_out_in_a_readonly_folder(readonly_dir, cache_dir, capsys):
    out = readonly_dir / "run"
    argv = ["train", "--preset", "tiny", "train.steps=1", f"out={out}", "--quiet"]
    one_line_exit_2(capsys, argv, out)


def test_cache_dir_that_is_a_file(a_file, tmp_path, monkeypatch, capsys):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"document {i} " * 50)
    monkeypatch.setenv("OUTLIERLAB_CACHE", str(a_file))
    argv = ["data", "prepare", "--source", str(corpus), "--quiet"]
    one_line_exit_2(capsys, argv, a_file, "OUTLIERLAB_CACHE")


def test_os_errors_naming_a_path_are_one_line_others_propagate(monkeypatch, capsys):
    import outlierlab.commands.runs as runs_cmd

    def fail(args):
        raise PermissionError(errno.EACCES, "Permission denied", "/some/where")

    monkeypatch.setattr(runs_cmd, "run", fail)
    one_line_exit_2(capsys, ["runs", "."], "/some/where", "permission denied")

    monkeypatch.setattr(runs_cmd, "run", lambda args: (_ for _ in ()).throw(OSError("no path")))
    with pytest.raises(OSError, match="no path"):  # no file name: a bug, keep the traceback
        main(["runs", "."])
    assert path_error(OSError(errno.EIO, "I/O error", "/x")) is None  # not a path problem
    assert "read-only" in path_error(OSError(errno.EROFS, "Read-only", "/x"))
