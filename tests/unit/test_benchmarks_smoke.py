"""The benchmark scripts import, answer ``--help``, and their harness interleaves correctly.
No timing is asserted anywhere (benchmarks/RESULTS.md holds the figures)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
SCRIPTS = ["train_step", "compile", "monitor_train", "quant_eval", "optim", "gpu_check",
           "real_model", "host_syncs", "mitigations_step", "mitigations_cost"]


def load(name: str):
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    if name == "_common":
        return importlib.import_module("_common")
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name, capsys):
    mod = load(name)
    with pytest.raises(SystemExit) as exc:
        mod.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "usage:" in out
    if name not in ("gpu_check", "real_model", "mitigations_cost"):  # no rounds: one run each
        assert "--quick" in out


def test_gpu_check_sh_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_interleave_alternates_order_and_ratios():
    common = load("_common")
    calls = []
    t = common.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                          rounds=3, warmup=1, gc_collect=False)  # fmt: skip
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]  # warm-up, then AB, BA, AB
    assert [len(t.seconds[k]) for k in "ab"] == [3, 3]
    t.seconds = {"a": [2.0, 4.0, 9.0], "b": [1.0, 1.0, 3.0]}
    assert t.ratios("a", "b") == [2.0, 4.0, 3.0]
    assert t.ratio("a", "b") == 3.0
    assert t.speed_ratio("a", "b") == pytest.approx(1 / 3)


def test_loop_interleaver_schedule_flips_each_round():
    common = load("_common")
    li = common.LoopInterleaver({"x": None, "y": None, "z": None}, block=5, rounds=2)
    assert li.schedule == ["x", "y", "z", "x", "y", "z", "z", "y", "x"]
