"""Run-folder test fixtures: synthetic run folders written through
:class:`~outlierlab.run_folder.RunFolder` without training (for the claims, the report and run
listings), and another process holding a run folder's lock.

Per-layer kurtosis rises from 1 towards ``kurt`` along a smooth curve, loss falls towards
``val_loss``; ``held_out`` adds the final held-out Kurt (``val_kurtosis*`` at the last step),
``entropy`` the attention entropy fields; ``init`` a step-0 row whose per-layer Kurt is ``init``
(so the run has a Kurt growth); everything is deterministic in the arguments.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from outlierlab.jsonable import write_json
from outlierlab.model.config import GPTConfig
from outlierlab.run_folder import RunFolder


def write_run(path: str | Path, *, arch: str = "pre-ln", optimizer: str = "adamw",
              lr: float = 1e-2, eps: float = 1e-12, seed: int = 0, kurt: float = 3.0,
              val_loss: float = 1.7, quant: dict[str, tuple[float, float]] | None = None,
              status: str = "finished", steps: int = 100, every: int = 20, n_layer: int = 4,
              cos_sim: float | None = None, extra: dict[str, Any] | None = None,
              held_out: float | None = None, entropy: float | None = None,
              trajectory: bool = False,
              init: float | None = None, tokens_per_s: float = 8000.0,
              measured: dict[str, Any] | None = None) -> Path:
    """Write a run folder; ``quant`` maps scheme → (fp_ppl, quant_ppl); ``measured`` is
    written as ``measure.json`` (what ``outlierlab measure RUN --save`` writes); ``trajectory``
    logs the held-out Kurt (rising from 1 towards ``held_out``) at every evaluation, not only
    the last."""
    run = RunFolder(path)
    model = GPTConfig.preset(
        arch, n_layer=n_layer, d_model=64, n_head=4, vocab_size=260, seq_len=64
    ).to_dict()
    config = {"model": model, "data": {"source": "stdlib", "tokenizer": "bytes"},
              "optim": {"name": optimizer, "lr": lr, "eps": eps, "weight_decay": 0.1},
              "train": {"steps": steps, "seed": seed, "batch_size": 16},
              "log": {"every": every}, "out": str(run.path)}
    for k, v in (extra or {}).items():
        section, _, name = k.partition(".")
        config[section][name] = v
    run.write_config(config)
    last = steps if status == "finished" else steps // 2
    run.set_status(status, last, "" if status == "finished" else status)
    rng = np.random.default_rng(seed)
    points = ["embed.resid_post"] + [f"blocks.{i}.resid_post" for i in range(n_layer)]
    layer_scale = np.linspace(0.6, 1.4, len(points))
    rows = []
    if init is not None:
        rows.append({"step": 0, "tokens": 0, "loss": val_loss + 2.0, "lr": 0.0,
                     "kurtosis": dict.fromkeys(points, init), "kurtosis_mean": init,
                     "kurtosis_max": init})
    for step in range(every, last + 1, every):
        t = step / steps
        rec: dict[str, Any] = {"step": step, "tokens": step * 1024,
                               "loss": val_loss + 2.0 * (1 - t) ** 2, "lr": lr,
                               "grad_norm": 1.0, "tokens_per_s": tokens_per_s}
        ks = {p: float(1 + (kurt - 1) * s * t + 0.01 * rng.random())
              for p, s in zip(points, layer_scale)}
        mean_k = float(np.mean(list(ks.values())))
        cs = cos_sim if cos_sim is not None else 0.1 + 0.05 * mean_k
        rec.update({"kurtosis": ks, "mmr": {p: 3.0 for p in points},
                    "cos_sim": {p: cs for p in points}, "kurtosis_mean": mean_k,
                    "kurtosis_max": max(ks.values())})
        if entropy is not None:
            rec["attn_entropy"] = {f"blocks.{i}.attn": entropy + 0.1 * i for i in range(n_layer)}
            rec["attn_entropy_min"] = entropy
        if step % (2 * every) == 0 or step == last:
            rec["val_loss"] = val_loss + 2.0 * (1 - t) ** 2 + 0.02
            rec["val_ppl"] = float(np.exp(rec["val_loss"]))
        if held_out is not None and (step == last or (trajectory and "val_loss" in rec)):
            f = 1.0 if step == last else t
            vk = {p: float(1 + (held_out - 1) * s * f) for p, s in zip(points, layer_scale)}
            rec.update({"val_kurtosis": vk, "val_kurtosis_mean": float(np.mean(list(vk.values()))),
                        "val_kurtosis_max": max(vk.values())})
        rows.append(rec)
    if status == "diverged":
        rows.append({"step": last + 1, "loss": float("nan")})
    writer = run.metrics_writer()
    for rec in rows:
        writer.write(rec)
    writer.close()
    if measured is not None:
        write_json(run.measure_file, measured)
    for scheme, (fp, q) in (quant or {}).items():
        write_json(run.quant_file(scheme),
                   {"scheme": scheme, "fp_ppl": fp, "quant_ppl": q, "layers": []})
    return run.path


_HOLD = ("import sys, time\nfrom outlierlab.run_folder import RunFolder\n"
         "lock = RunFolder(sys.argv[1]).lock('outlierlab test-holder')\n"
         "print('held', flush=True)\ntime.sleep(120)\n")


def hold_lock(path: str | Path) -> subprocess.Popen:
    """Another process holding the lock of run folder ``path`` (until it is killed)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path)], stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def snapshot(folder: str | Path) -> dict[str, Any]:
    """Every entry under ``folder`` (links not followed): a file's bytes, a link's target, a
    folder's name; to assert that a command changed nothing there."""
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(folder))
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", p.read_bytes())
    return out
