"""RunFolder: strict readers, the one JSON writer, discovery, the lock (held by a real other
process, taken over from a dead one), malformed runs in `runs` and `report`, newest weights."""

from __future__ import annotations

import json
import math
import os
import time

import pytest

from outlierlab.cli import main
from outlierlab.errors import RunFolderError, RunInUseError
from outlierlab.jsonable import write_json
from outlierlab.run_folder import RunFolder, find_runs
from run_fixtures import dead_pid, hold_lock, write_run


def test_write_json_is_atomic_and_nan_safe(tmp_path):
    path = write_json(tmp_path / "a" / "b.json", {"x": math.nan, "y": [math.inf, 1.5], "z": (1,)})
    assert json.loads(path.read_text()) == {"x": None, "y": [None, 1.5], "z": [1]}
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]  # no temporary left


def test_strict_readers_name_the_file(tmp_path):
    run = RunFolder(write_run(tmp_path / "r"))
    assert run.is_run and run.status["status"] == "finished" and len(run.metrics) == 5
    assert run.section("optim")["name"] == "adamw" and run.data_config.tokenizer == "bytes"
    run.status_file.write_text("[1]")
    with pytest.raises(RunFolderError, match=r"status\.json: expected a JSON object"):
        _ = run.status
    run.metrics_file.write_bytes(b'{"step": 1}\n\xff\xfe\n')
    with pytest.raises(RunFolderError, match=r"metrics\.jsonl: not UTF-8"):
        _ = run.metrics
    run.metrics_file.write_text('{"step": 1}\n[2]\n{"step": "x"}\n{"step": 3, "lo')  # cut short
    assert run.metrics == [{"step": 1}]
    cfg = json.loads(run.config_file.read_text())
    run.config_file.write_text(json.dumps({**cfg, "optim": 5}))
    with pytest.raises(RunFolderError, match="section 'optim' is 5, expected a table"):
        _ = run.config
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2"}')
    assert not RunFolder(hf).is_run and not RunFolder(tmp_path / "nothing").is_run


def test_find_runs_one_discovery(tmp_path):
    for name in ("sweep/a", "sweep/b", "deep/x/c", "deeper/1/2/d"):
        write_run(tmp_path / name)
    (tmp_path / "sweep" / "report").mkdir()
    names = [r.path.name for r in find_runs([tmp_path])]
    assert names == ["c", "a", "b"]  # 3 levels down, sorted; "d" is 4 levels down
    assert [r.path.name for r in find_runs([tmp_path / "sweep" / "a", tmp_path / "sweep"])] \
        == ["a", "b"]  # a run given directly, then the rest without repeats


def test_set_status_keeps_the_old_data_fingerprint(tmp_path):
    run = RunFolder(tmp_path)
    run.set_status("running", 0, data_fingerprint={"files": 1})
    assert run.data_changes({"files": 1}) == []
    assert run.data_changes({"files": 2, "bytes": 3}) == ["bytes", "files"]
    RunFolder(tmp_path).set_status("running", 7, data_fingerprint={"files": 2})
    st = run.status
    assert st["data_fingerprint"] == {"files": 2}
    assert st["data_history"] == [{"until_step": 7, "fingerprint": {"files": 1}}]


def test_lock_is_exclusive_across_processes_and_dies_with_its_holder(tmp_path):
    run = RunFolder(tmp_path / "run")
    holder = hold_lock(run.path)
    try:
        with pytest.raises(RunInUseError) as err:
            run.lock("outlierlab train")
        msg = str(err.value)
        assert f"is in use by pid {holder.pid} (outlierlab test-holder, started " in msg
        assert "\n" not in msg
        assert run.lock_holder()["pid"] == holder.pid
    finally:
        holder.kill()  # SIGKILL: the kernel drops the flock, the file stays behind
        holder.wait()
    assert json.loads(run.lock_file.read_text())["pid"] == holder.pid
    assert run.lock_holder() is None
    with run.lock("outlierlab train") as lock:
        assert lock.previous["pid"] == holder.pid  # the stale holder, taken over
        assert run.lock_holder()["pid"] == os.getpid()
    assert not run.lock_file.exists() and run.lock_holder() is None


def test_stale_lock_file_of_a_dead_pid_is_taken_over(tmp_path):
    import socket

    pid = dead_pid()
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.lock_file.write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                         "purpose": "outlierlab train", "started": "x"}))
    lock = run.lock("outlierlab quantize --save")
    try:
        assert lock.previous["pid"] == pid
        assert json.loads(run.lock_file.read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert run.path.is_dir()  # the lock did not create it: kept


def test_malformed_runs_are_listed_as_unreadable_not_fatal(tmp_path, capsys):
    root = tmp_path / "runs"
    for name in ("good", "status", "metrics", "config"):
        write_run(root / name, quant={"w8a8-tensor": (10.0, 11.0)})
    (root / "status" / "status.json").write_text("[1]")
    (root / "metrics" / "metrics.jsonl").write_bytes(b"\xff\xfe\x00garbage\n")
    cfg = json.loads((root / "config" / "config.json").read_text())
    (root / "config" / "config.json").write_text(json.dumps({**cfg, "optim": 5}))

    assert main(["runs", str(root), "--json"]) == 0
    rows = {json.loads(line)["run"].rsplit("/", 1)[1]: json.loads(line)
            for line in capsys.readouterr().out.splitlines()}
    assert rows["good"]["status"] == "finished" and rows["good"]["step"] == 100
    for name, why in (("status", "expected a JSON object"), ("metrics", "not UTF-8"),
                      ("config", "section 'optim' is 5")):
        assert rows[name]["status"] == "unreadable" and why in rows[name]["message"]
    assert main(["runs", str(root)]) == 0
    out = capsys.readouterr().out
    assert "good" in out and out.count("unreadable: ") == 3

    assert main(["report", str(root), "--out", str(tmp_path / "rep")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all("skipped unreadable run" in line for line in err)
    data = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert [r["name"] for r in data["runs"]] == ["good"]


def test_quantize_refuses_a_diverged_or_crashed_run(tmp_path, capsys):
    for status in ("diverged", "crashed"):
        run = write_run(tmp_path / status, status=status)
        assert main(["quantize", str(run)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{run} {status}" in err[0] and "step-N" in err[0]


def test_quantize_save_waits_for_nobody(tmp_path, capsys):
    """`quantize` writing into a run folder takes its lock: refused while another holds it."""
    run = write_run(tmp_path / "run")
    holder = hold_lock(run)
    try:
        t = time.monotonic()
        assert main(["quantize", str(run)]) == 2
        assert time.monotonic() - t < 30
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by pid {holder.pid}" in err[0]
    finally:
        holder.kill()
        holder.wait()


def test_without_flock_the_pid_in_the_file_decides(tmp_path, monkeypatch):
    """Filesystems without flock (some NFS): a live pid on this host holds the folder, a dead
    one is taken over."""
    import socket

    from outlierlab import run_folder

    monkeypatch.setattr(run_folder, "_try_flock", lambda fd: "unsupported")
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    for pid, held in ((os.getppid(), True), (dead_pid(), False)):
        run.lock_file.write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
        if held:
            with pytest.raises(RunInUseError, match=f"in use by pid {pid}"):
                run.lock("outlierlab train")
            assert run.lock_holder()["pid"] == pid
        else:
            assert run.lock_holder() is None
            with run.lock("outlierlab train") as lock:
                assert lock.previous["pid"] == pid


def test_unwritable_run_folder_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "file" / "run"):
        with pytest.raises(RunFolderError, match=f"cannot write the run folder {path} "):
            RunFolder(path).lock("outlierlab train")
