"""Kurt at matched validation loss (issue 23, experiments/matched.py): interpolation by hand,
no extrapolation, and the claims deciding on it."""

import math
from pathlib import Path

import numpy as np
import pytest

from outlierlab.experiments import claims as C
from outlierlab.experiments.matched import kurt_at_loss, matched_cell
from outlierlab.experiments.results import RunRecord, load_run
from run_fixtures import write_run


def test_kurt_at_loss_by_hand():
    loss, kurt = [5.0, 3.0, 2.0, 2.2], [1.2, 2.0, 4.0, 5.0]
    # 2.5 lies only in the segment (3.0 → 2.0): 2.0 + (2.5 − 3)/(2 − 3)·(4 − 2) = 3.0
    assert kurt_at_loss(loss, kurt, 2.5) == pytest.approx(3.0)
    # 2.1 lies in (3 → 2) and in (2 → 2.2): the latest segment: 4 + 0.5·(5 − 4) = 4.5
    assert kurt_at_loss(loss, kurt, 2.1) == pytest.approx(4.5)
    assert kurt_at_loss(loss, kurt, 2.2) == 5.0  # the end itself
    assert math.isnan(kurt_at_loss(loss, kurt, 1.9))  # below the range: not extrapolated
    assert math.isnan(kurt_at_loss(loss, kurt, 6.0))
    assert math.isnan(kurt_at_loss([], [], 2.0))


def _rec(name, seed, loss, kurt, k0=1.5):
    return RunRecord(path=Path(name), config={"train": {"seed": seed}}, status="finished",
                     step=300, val_steps=np.arange(len(loss)) * 100,
                     val_loss=np.array(loss, float), val_kurt=np.array(kurt, float),
                     kurt_steps=np.array([0]), kurtosis={"embed": np.array([k0])})


def test_matched_cell_reads_both_runs_at_the_worse_final_loss():
    low = [_rec("op-0", 0, [5.0, 3.0, 2.0], [1.1, 2.0, 3.0], k0=1.1),
           _rec("op-1", 1, [5.0, 3.0, 2.6], [1.1, 2.0, 3.0], k0=1.1)]
    high = [_rec("pre-0", 0, [5.0, 3.0, 2.5], [1.5, 4.0, 6.0]),
            _rec("pre-1", 1, [5.0, 3.0, 2.0], [1.5, 4.0, 6.0])]
    m = matched_cell(low, high, growth=False)
    # seed 0: L = 2.5; OP at 2.5: 2.0 + 0.5·1.0 = 2.5; Pre-LN at its end 6.0
    assert m.points[0] == {"loss": 2.5, "kurt_low": pytest.approx(2.5), "kurt_high": 6.0}
    assert m.diffs[0] == pytest.approx(3.5)
    # seed 1: L = 2.6 (OP's end); Pre-LN at 2.6: 4 + 0.4·2 = 4.8
    assert m.diffs[1] == pytest.approx(4.8 - 3.0)
    g = matched_cell(low, high, growth=True)
    # growth Kurt(L) − Kurt₀: Pre-LN 6.0 − 1.5, OP 2.5 − 1.1 (not the log excess ratio, which
    # near OP's Kurt₀ = 1.1 would read OP's growth as the larger: log(1.5/0.1) > log(5/0.5))
    assert g.diffs[0] == pytest.approx((6.0 - 1.5) - (2.5 - 1.1))
    # a run whose trajectory never reaches L: named, no value
    out = matched_cell([_rec("op-0", 0, [2.4, 2.3], [1.1, 1.2])], high[:1], growth=False)
    assert not out.diffs and "loss 2.500 outside op-0's trajectory (2.300–2.400)" in out.missing[0]
    short = matched_cell([_rec("op-0", 0, [2.4], [1.1])], high[:1], growth=False)
    assert "no held-out Kurt trajectory in op-0" in short.missing[0]


def test_op_claim_decides_at_matched_loss_not_at_the_ends(tmp_path):
    """OP ends with higher Kurt than Pre-LN but at a much lower loss; at Pre-LN's final loss
    OP's Kurt was lower: the claim holds at matched loss, the ends point the other way."""
    runs = []
    for s in (0, 1, 2, 3):
        runs.append(load_run(write_run(tmp_path / f"pre-{s}", arch="pre-ln", seed=s, kurt=2.5,
                                       held_out=2.5, val_loss=2.0, init=1.4, trajectory=True)))
        runs.append(load_run(write_run(tmp_path / f"op-{s}", arch="op", seed=s, kurt=3.0,
                                       held_out=3.0 + 0.01 * s, val_loss=1.5, init=1.4,
                                       trajectory=True)))
    claim = C.claim_op_vs_prenorm(runs)
    assert claim.test["matched_loss"] and claim.verdict == C.HELD
    assert claim.test["p"] == pytest.approx(1 / 16)
    assert claim.test["end"]["in_direction"] == 0  # at the ends OP's growth is larger
    ev = claim.evidence[0]
    assert ev["kurt_matched_low"] < ev["kurt_matched_high"] < ev["kurt_low"]
    assert all(p["loss"] == pytest.approx(2.02) for p in ev["matched"].values())
    assert "at matched validation loss" in claim.summary and not ev["note"]
