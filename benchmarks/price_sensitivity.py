"""CPU cost of ``price --sensitivity``'s search alone on a real model (issue 22): the layer
sensitivity of ``w8a8-tensor`` on the first 2 of price's 16 validation windows, its verified
16-bit recommendation and the check on all 16 windows, with the CPU seconds (user + system) of
every evaluation. On a shared machine CPU seconds mean more than wall time; run it with
``OMP_NUM_THREADS=1`` there (two threads on an oversubscribed machine spin while they wait for
each other, which inflates CPU seconds up to 3×: 9 CPU-s an evaluation at load 14 against
2.8 with one thread).

    OMP_NUM_THREADS=1 python benchmarks/price_sensitivity.py $G --data $EMAIL --json OUT.json

The calibration here is the search's own (on the page, ``w8a8-tensor``'s row has already done
it); the last lines print the stage's CPU seconds with and without it and the recommendation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: F401  (puts the checkout's src on the path)


def clock() -> tuple[float, float]:
    t = os.times()
    return time.perf_counter(), t.user + t.system


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--data", default=None)
    p.add_argument("--json", default=None, help="write the sensitivity result and the log here")
    args = p.parse_args(argv)
    from outlierlab.model_data import eval_set
    from outlierlab.quant import CalibCache, scheme
    from outlierlab.quant import sensitivity as S
    from outlierlab.quant.calibrate import calibrate
    from outlierlab.quant.evaluate import logits_of
    from outlierlab.quant.wrap import wrap

    ev = eval_set(args.model, "cpu", None, args.data, None, 16, 4, 4, 0)
    model = ev.loaded.model.eval()
    cfg, cache = scheme("w8a8-tensor"), CalibCache()
    t0 = clock()
    calibrate(wrap(model, cfg), cfg, ev.calib, logits_of, cache)  # as the page's row does
    t1 = clock()
    log: list[dict[str, float]] = []
    call = S._Damage.__call__

    def timed(self, quantised, stats=False):  # type: ignore[no-untyped-def]
        a = clock()
        r = call(self, quantised, stats)
        b = clock()
        log.append({"quantised": len(quantised), "wall_s": b[0] - a[0], "cpu_s": b[1] - a[1],
                    "kl": r["kl"]})  # fmt: skip
        return r

    S._Damage.__call__ = timed
    res = S.layer_sensitivity(model, cfg, ev.calib, ev.val_x[:2], ev.val_y[:2], 4, 0.9, cache,
                              check=(ev.val_x, ev.val_y), check_full=True)  # fmt: skip
    t2 = clock()
    rec = res["recommendation"]
    from outlierlab.quant.evaluate import perplexity

    fp = perplexity(model, ev.val_x, ev.val_y, 4)[0]
    ppl_rec = (rec["check_full_ppl"] - rec["check_ppl"]) / (rec["check_full_ppl"] - fp)
    if args.json:
        Path(args.json).write_text(json.dumps({**res, "log": log}, default=str))
    print(f"load average {os.getloadavg()[0]:.2f}; threads {os.environ.get('OMP_NUM_THREADS')}")
    print(f"calibration: {t1[0] - t0[0]:.0f} s wall, {t1[1] - t0[1]:.0f} CPU-s")
    print(f"sensitivity (calibration shared): {t2[0] - t1[0]:.0f} s wall, {t2[1] - t1[1]:.0f} "
          f"CPU-s; {res['evaluations']} evaluations, {res['block_passes']:.1f} whole passes, "
          f"evaluations' CPU-s {sum(e['cpu_s'] for e in log):.0f}")  # fmt: skip
    print(f"keep {len(rec['keep_16bit'])}: {rec['keep_16bit']}")
    print(f"verified recovery {rec['verified_recovery']:.3f} (KL, {rec['verifications']} "
          f"verifications: {[h['keep'] for h in rec['history']]}), predicted "
          f"{rec['predicted_recovery']:.3f}; perplexity on 16 windows {rec['check_full_ppl']:.3f}"
          f" → {rec['check_ppl']:.3f} (FP {fp:.3f}): {ppl_rec:.3f} recovered")  # fmt: skip


if __name__ == "__main__":
    main()
