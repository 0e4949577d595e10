"""outlierlab attached to a REAL torchtitan ``Trainer`` (llama3 debug model, 4 steps on CPU),
where torchtitan is installed (it is not in the README set-up: it needs triton, ~1 GB, and
three patches to run on a CPU-only torch; see tests/integration/titan_cpu.py and
docs/integrations.md for how to run this). The stand-in of test_integrations_torchtitan.py
runs everywhere; this checks that stand-in's assumptions against the real trainer."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan")
pytest.importorskip("triton")  # torchtitan's model modules import it

HERE = Path(__file__).parent


def run(out: Path, *args: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = os.pathsep.join([str(HERE.parents[1] / "src"), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": src}
    cmd = [sys.executable, str(HERE / "titan_cpu.py"), str(out), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "result.json").read_text())


@pytest.mark.parametrize("args", [(), ("--accumulate",), ("--compile", "aot_eager")],
                         ids=["plain", "accumulate", "compiled-blocks"])
def test_real_trainer_logs_outlier_metrics_at_measured_steps(tmp_path, args):
    r = run(tmp_path, *args)
    assert [step for step, _ in r["history"]] == [2, 4]  # every=2 over 4 optimiser steps
    for _, m in r["history"]:
        assert m["outliers/tokens"] == r["tokens_per_step"]  # every micro-batch of the step, once
        assert math.isfinite(m["outliers/kurtosis_max"]) and m["outliers/kurtosis_max"] >= 1
        assert m["outliers/kurtosis_max"] >= m["outliers/kurtosis_mean"] >= 1
        points = {k.rsplit("/", 1)[1] for k in m if k.startswith("outliers/kurtosis/")}
        assert points == {"embed.resid_post"} | {f"blocks.{i}.resid_post" for i in range(6)}
    before, attached, after = r["hooks"]
    assert attached > before and after == before  # trainer.close() removed outlierlab's hooks
    assert r["tensorboard"]["outliers/kurtosis_max"] == [2, 4]  # through its metrics logger
