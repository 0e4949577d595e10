"""Post-hoc measurements the mitigations leaderboard reads (issue 25, docs/mitigations.md).

For every finished run of a mitigations sweep that the sweep has quantised (its
``quant/w8a6-tensor.json`` exists), seed 0 of every method first: ``w6a6-tensor`` and
``w4a4-online``, computed exactly as ``outlierlab quantize RUN --scheme S --calib-batches 16
--batch-size 8 --eval-windows 64 --stats-windows 16`` computes and writes them (the preset's
[quant] args), but with one load, one FP pass and one calibration cache per run; then
``outlierlab measure RUN --save --max-tokens 8192`` (first-token attention, max/median). Runs
with every result already present are skipped; one failing run does not stop the others.

    nice -n 10 .venv/bin/python scripts/leaderboard_posthoc.py SWEEP_DIR [--follow]
"""
import argparse
import re
import sys
import time
from pathlib import Path

import torch

from outlierlab.cli import main as cli
from outlierlab.jsonable import write_json
from outlierlab.model_data import eval_set
from outlierlab.quant import scheme
from outlierlab.quant.calibrate import CalibCache
from outlierlab.quant.evaluate import perplexity, quantize_and_evaluate
from outlierlab.run_folder import RunFolder

SCHEMES = ("w6a6-tensor", "w4a4-online")


def eligible(root: Path) -> list[tuple[int, str, RunFolder, list[str]]]:
    """(seed, name, run, schemes to do) of the runs with something left to do."""
    runs = []
    for d in root.iterdir():
        r = RunFolder(d)
        if not r.is_run or r.status.get("status") != "finished":
            continue
        if not r.quant_file("w8a6-tensor").is_file():
            continue  # the sweep is still quantising it
        todo = [s for s in SCHEMES if not r.quant_file(s).is_file()]
        if todo or not r.measure_file.is_file():
            m = re.search(r"seed(\d+)$", d.name)
            seed = int(m.group(1)) if m else 0
            runs.append((seed, d.name, r, todo))
    return sorted(runs, key=lambda t: (t[0], t[1]))


def do(r: RunFolder, todo: list[str]) -> None:
    """The missing schemes of run ``r``, then its measure.json."""
    if todo:
        ev = eval_set(r.path, "cpu", None, None, None, 64, 16, 8, 0)
        with torch.no_grad():
            t0 = time.perf_counter()
            ppl, loss = perplexity(ev.loaded.model, ev.val_x, ev.val_y, 8)
            fp = {"ppl": ppl, "loss": loss, "seconds": time.perf_counter() - t0}
            cache = CalibCache()
            for s in todo:
                t0 = time.time()
                res = quantize_and_evaluate(ev.loaded.model, scheme(s), ev.calib, ev.val_x,
                                            ev.val_y, 8, 16, fp=fp, cache=cache, points=ev.points)
                step = {"step": ev.loaded.step} if ev.loaded.step is not None else {}
                res = {"model": str(r.path), "kind": ev.loaded.kind, **step,
                       "data": ev.data.source, **res}
                with r.lock("outlierlab quantize --save"):
                    write_json(r.quant_file(s), res)
                print(f"{time.strftime('%T')} {r.path.name} {s} {time.time() - t0:.0f} s "
                      f"{res['quant_ppl'] / res['fp_ppl'] - 1:+.2%}", flush=True)
    if not r.measure_file.is_file():
        t0 = time.time()
        rc = cli(["measure", str(r.path), "--save", "--max-tokens", "8192"])
        print(f"{time.strftime('%T')} {r.path.name} measure rc={rc} {time.time() - t0:.0f} s",
              flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep", type=Path, help="the mitigations sweep's folder")
    p.add_argument("--follow", action="store_true", help="keep waiting for runs the sweep "
                   "finishes until the file SWEEP/.posthoc-stop exists")
    args = p.parse_args()
    root = args.sweep
    torch.set_num_threads(1)
    failed = set()
    while True:
        todo = [t for t in eligible(root) if t[1] not in failed]
        if not todo:
            if not args.follow or (root / ".posthoc-stop").exists():
                break
            time.sleep(60)
            continue
        _, name, r, schemes = todo[0]
        try:
            do(r, schemes)
        except Exception as exc:  # one bad run must not stop the others
            print(f"{time.strftime('%T')} {name} FAILED: {exc!r}", flush=True)
            failed.add(name)
            time.sleep(5)
        sys.stdout.flush()


if __name__ == "__main__":
    main()
