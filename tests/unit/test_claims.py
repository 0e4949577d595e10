"""Claims of SPEC §5 on synthetic run folders whose answer is known: held, did not hold, and
not tested when the runs a claim needs are missing."""

import math

import numpy as np
import pytest

from outlierlab.experiments import claims as C
from outlierlab.experiments.results import load_run, load_runs
from run_fixtures import write_run


def test_rankdata_and_spearman_by_hand():
    assert C.rankdata([10, 30, 20, 20]).tolist() == [1.0, 4.0, 2.5, 2.5]
    assert C.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert C.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ρ = 1 − 6Σd²/(n(n²−1)) without ties: ranks y = 2,1,4,3,5 → Σd² = 4 → ρ = 0.8
    assert C.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5]) == pytest.approx(0.8)
    # with ties: Pearson of average ranks, checked with numpy
    x, y = [1, 2, 2, 3, 5], [3, 1, 2, 2, 9]
    rx, ry = C.rankdata(x), C.rankdata(y)
    assert C.spearman(x, y) == pytest.approx(np.corrcoef(rx, ry)[0, 1])
    assert math.isnan(C.spearman([1, 1, 1], [1, 2, 3]))
    # exact permutation p: a perfect order among 4 is 1 of 24 permutations
    assert C.permutation_p([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1 / 24)


def _runs(tmp_path, specs):
    return [load_run(write_run(tmp_path / name, **kw)) for name, kw in specs.items()]


def test_everything_held(tmp_path):
    specs = {}
    for s in (0, 1):
        specs[f"pre-{s}"] = dict(arch="pre-ln", kurt=4.0 + 0.3 * s, seed=s,
                                 quant={"w8a8-tensor": (5.0, 9.0 + s)})
        specs[f"op-{s}"] = dict(arch="op", kurt=2.0 + 0.1 * s, seed=s, val_loss=1.72,
                                quant={"w8a8-tensor": (5.0, 5.6)})
        specs[f"op-soap-{s}"] = dict(arch="op", optimizer="soap", kurt=1.2, seed=s,
                                     quant={"w8a8-tensor": (5.0, 5.1)})
        specs[f"pre-lr-{s}"] = dict(arch="pre-ln", lr=1e-3, kurt=1.5, seed=s)
        specs[f"pre-eps-{s}"] = dict(arch="pre-ln", eps=1e-4, kurt=1.8, seed=s)
    runs = _runs(tmp_path, specs)
    res = {c.key: c for c in C.evaluate_claims(runs)}
    assert {k: c.verdict for k, c in res.items()} == {
        "op_vs_prenorm": C.HELD, "lower_lr": C.HELD, "larger_eps": C.HELD,
        "soap_vs_adamw": C.HELD, "kurt_vs_quant": C.HELD}
    ev = res["op_vs_prenorm"].evidence[0]
    # the numbers are the seeds' means of the final mean Kurt, not written-down values
    pre = [r for r in runs if r.name.startswith("pre-") and r.name[-1].isdigit()
           and r.name.count("-") == 1]
    assert ev["kurt_prenorm"] == pytest.approx(np.mean([r.final_kurt_mean for r in pre]))
    assert "2 seeds" in res["op_vs_prenorm"].details[0]
    assert res["kurt_vs_quant"].evidence[0]["n"] == 6
    assert res["kurt_vs_quant"].evidence[0]["rho"] > 0.8


def test_everything_did_not_hold(tmp_path):
    specs = {
        "pre": dict(arch="pre-ln", kurt=2.0, quant={"w8a8-tensor": (5.0, 5.1)}),
        "op": dict(arch="op", kurt=3.0, quant={"w8a8-tensor": (5.0, 5.05)}),
        "op-soap": dict(arch="op", optimizer="soap", kurt=3.5, quant={"w8a8-tensor": (5.0, 5.0)}),
        "pre-lr": dict(arch="pre-ln", lr=1e-3, kurt=2.5),
        "pre-eps": dict(arch="pre-ln", eps=1e-4, kurt=2.5),
    }
    res = {c.key: c for c in C.evaluate_claims(_runs(tmp_path, specs))}
    assert {k: c.verdict for k, c in res.items()} == {
        "op_vs_prenorm": C.NOT_HELD, "lower_lr": C.NOT_HELD, "larger_eps": C.NOT_HELD,
        "soap_vs_adamw": C.NOT_HELD, "kurt_vs_quant": C.NOT_HELD}
    assert "OP lower in 0 of 1" in res["op_vs_prenorm"].summary


def test_not_tested_when_configs_are_missing(tmp_path):
    runs = _runs(tmp_path, {"a": dict(arch="pre-ln", kurt=3.0),
                            "b": dict(arch="op", kurt=3.0, optimizer="soap", lr=3e-3)})
    res = {c.key: c for c in C.evaluate_claims(runs)}
    assert all(c.verdict == C.NOT_TESTED for c in res.values()), res


def test_unmatched_loss_is_not_tested_and_diverged_runs_are_left_out(tmp_path):
    runs = _runs(tmp_path, {
        "pre": dict(arch="pre-ln", kurt=4.0, val_loss=1.5),
        "op": dict(arch="op", kurt=1.5, val_loss=2.5),
        "post": dict(arch="post-ln", kurt=9.0, status="diverged"),
    })
    c = C.claim_op_vs_prenorm(runs)
    assert c.verdict == C.NOT_TESTED and "matched loss" in c.summary
    assert any("diverged: post" in d for d in c.details)
    assert C.claim_op_vs_prenorm(runs, loss_tol=1.0).verdict == C.HELD
    # an OP model that is better (lower loss) counts: its low Kurt is not bought with loss
    better = _runs(tmp_path / "b", {"pre": dict(arch="pre-ln", kurt=4.0, val_loss=2.5),
                                    "op": dict(arch="op", kurt=1.5, val_loss=1.5)})
    assert C.claim_op_vs_prenorm(better).verdict == C.HELD


def test_quant_claim_needs_measurable_damage(tmp_path):
    specs = {f"r{i}": dict(arch="pre-ln", kurt=1.0 + i, lr=10.0**-i,
                           quant={"w8a8-tensor": (10.0, 10.0 + 0.001 * (-1) ** i),
                                  "w8a4": (10.0, 10.0 + i)}) for i in range(4)}
    c = C.claim_quant(_runs(tmp_path, specs))
    assert c.verdict == C.NOT_TESTED and "nothing to rank" in c.summary
    assert any(d.startswith("w8a4: ρ(Kurt, ppl increase) = +1.00") for d in c.details)


def test_soap_pairs_across_optimiser_defaults(tmp_path):
    """SOAP and AdamW runs differ in betas/weight decay (each optimiser's defaults): still a
    pair, as long as lr and ε match."""
    runs = _runs(tmp_path, {
        "adam": dict(arch="op", kurt=2.0),
        "soap": dict(arch="op", optimizer="soap", kurt=1.1,
                     extra={"optim.betas": [0.95, 0.95], "optim.weight_decay": 0.01}),
        "soap-other-lr": dict(arch="op", optimizer="soap", kurt=5.0, lr=3e-3),
    })
    c = C.claim_soap(runs)
    assert c.verdict == C.HELD and len(c.evidence) == 1


def test_load_runs_expands_a_sweep_folder_and_skips_other_folders(tmp_path):
    write_run(tmp_path / "sweep" / "a")
    write_run(tmp_path / "sweep" / "b", arch="op")
    (tmp_path / "sweep" / "report").mkdir()
    runs, unreadable = load_runs([tmp_path / "sweep"])
    assert unreadable == []
    assert [r.name for r in runs] == ["a", "b"]
    assert [r.arch for r in runs] == ["pre-ln", "op"]
    r = runs[0]
    assert r.kurt_steps.tolist() == [20, 40, 60, 80, 100]
    assert r.final_kurt_mean == pytest.approx(np.mean([v[-1] for v in r.kurtosis.values()]))
    assert r.peak_kurt_max >= r.final_kurt_max >= r.final_kurt_mean
    with pytest.raises(Exception, match="no run folders"):
        load_runs([tmp_path / "sweep" / "report"])


def test_comparisons_without_outlier_features_are_left_out(tmp_path):
    """Near Kurt 1 there is nothing to lower: such pairs and series do not decide a claim."""
    runs = _runs(tmp_path, {
        "pre": dict(arch="pre-ln", kurt=1.12, lr=3e-3), "op": dict(arch="op", kurt=1.13, lr=3e-3),
        "pre-hi": dict(arch="pre-ln", kurt=5.0), "op-hi": dict(arch="op", kurt=2.0),
        "pre-soap": dict(arch="pre-ln", optimizer="soap", kurt=1.2, lr=3e-3),
    })
    c = C.claim_op_vs_prenorm(runs)
    assert c.verdict == C.HELD and "1 of 1" in c.summary
    assert any("no OFs in Pre-Norm" in d for d in c.details)
    low = [r for r in runs if r.lr == 3e-3]
    assert C.claim_op_vs_prenorm(low).verdict == C.NOT_TESTED
    assert C.claim_soap(low).verdict == C.NOT_TESTED
    assert C.claim_lr(runs).verdict == C.HELD
