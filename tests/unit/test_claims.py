"""Claims of science §5 and the ablations on synthetic run folders whose answer is known: held,
did not hold, inconclusive (too few seeds, no significance), and not tested when the runs a
claim needs are missing or differ in more than the field under test."""

import math

import numpy as np
import pytest

from outlierlab.experiments import claims as C
from outlierlab.experiments.results import load_run, load_runs
from outlierlab.run_folder import RunFolder
from run_fixtures import write_run

SEEDS = (0, 1, 2, 3)  # one cell of 4 same-seed pairs all in one direction: p = 2⁻⁴ = 0.0625


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
    # exact permutation p: a perfect order among 4 is 1 of 24 permutations (either side)
    assert C.permutation_p([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1 / 24)
    assert C.permutation_p([1, 2, 3, 4], [4, 3, 2, 1], greater=False) == pytest.approx(1 / 24)


def test_rank_sum_permutation_p_by_hand():
    # 3 v 3 fully separated: 1 of C(6,3) = 20 splits has a rank sum as small
    assert C.rank_sum_p([1, 2, 3], [4, 5, 6]) == (pytest.approx(1 / 20), 1.0)
    assert C.rank_sum_p([4, 5, 6], [1, 2, 3]) == (1.0, pytest.approx(1 / 20))
    # 2 v 2 can never get below 1/6; 1 v 1 below 1/2
    assert C.rank_sum_p([1, 2], [3, 4])[0] == pytest.approx(1 / 6)
    assert C.rank_sum_p([1], [2])[0] == pytest.approx(1 / 2)
    # rank sum 7 (1, 2, 4 against 3, 5, 6): splits {1,2,3} and {1,2,4} → 2/20
    assert C.rank_sum_p([1, 2, 4], [3, 5, 6])[0] == pytest.approx(0.1)
    # a diverged run is −inf: still ranked, lowest
    assert C.rank_sum_p([-math.inf] * 3, [0.5, 0.7, 0.6])[0] == pytest.approx(1 / 20)


def test_sign_flip_p_by_hand():
    # N pairs all up: only the identity flip (of 2ᴺ) reaches the observed sum
    assert C.sign_flip_p([[1.0, 2.0, 3.0]]) == (pytest.approx(1 / 8), 1.0)
    assert C.sign_flip_p([[1.0, 2.0, 3.0, 4.0]]) == (pytest.approx(1 / 16), 1.0)
    # |d| = 1, 2, 3, 0.5 with the 0.5 down: sum 5.5 of 6.5; flips reaching it are {} and
    # {0.5}: 2/16; the other way, 15 of 16 flips are ≤ 5.5 (all but the all-up one)
    assert C.sign_flip_p([[1.0, 2.0, 3.0, -0.5]]) == (pytest.approx(2 / 16),
                                                       pytest.approx(15 / 16))
    # two cells, each cell's mean counts once: [10] and [1, 1] → weights 1, 1/2, 1/2; up:
    # 10 + 0.5 + 0.5 = 11; flips ≥ 11: only all up → 1/8; the big cell does not drown the
    # small one's sign (flipping it alone gives 10 + 0 = 10 < 11)
    assert C.sign_flip_p([[10.0], [1.0, 1.0]])[0] == pytest.approx(1 / 8)
    # stratified: 3 cells of 2 pairs all up: 1/64
    assert C.sign_flip_p([[1, 2], [0.1, 0.2], [5, 6]])[0] == pytest.approx(1 / 64)
    # many pairs: the Monte Carlo form, observed flip counted
    p, q = C.sign_flip_p([[1.0] * 20])
    assert p == pytest.approx(1 / 20001) and q == 1.0


def test_effect_test_verdicts():
    up4 = {s: 1.0 + s for s in SEEDS}
    t = C.EffectTest.of([up4])
    assert (t.verdict, t.pairs, t.seeds, t.in_direction) == (C.HELD, 4, 4, 4)
    assert t.p == pytest.approx(1 / 16)
    assert C.EffectTest.of([{s: -v for s, v in up4.items()}]).verdict == C.NOT_HELD
    # three seeds in one cell: p = 1/8 > 0.1 either way: inconclusive, however clear
    three = {0: 1.0, 1: 2.0, 2: 3.0}
    assert C.EffectTest.of([three]).verdict == C.INCONCLUSIVE
    # ... the same three seeds in two cells: 6 pairs, p = 1/64
    assert C.EffectTest.of([three, three]).verdict == C.HELD
    # every pair against is not enough: "did not hold" needs significance the other way
    assert C.EffectTest.of([{0: -1.0, 1: -2.0, 2: -3.0}]).verdict == C.INCONCLUSIVE
    # fewer than 3 seeds: indicative only, however many cells
    two = {0: 1.0, 1: 2.0}
    assert C.EffectTest.of([two, two, two]).verdict == C.INDICATIVE
    assert C.EffectTest.of([]).verdict == C.NOT_TESTED


def test_seed_test_verdicts():
    three = dict(zip((0, 1, 2), [1.0, 1.1, 1.2])), dict(zip((0, 1, 2), [3.0, 3.1, 3.2]))
    t = C.SeedTest.of(*three)
    assert (t.verdict, t.seeds, t.in_direction, t.p) == (C.HELD, 3, 3, pytest.approx(0.05))
    assert C.SeedTest.of(three[1], three[0]).verdict == C.NOT_HELD
    # two seeds a side: indicative only, even when every pair is against
    assert C.SeedTest.of({0: 1.0, 1: 1.1}, {0: 3.0, 1: 3.1}).verdict == C.INDICATIVE
    assert C.SeedTest.of({0: 3.0, 1: 3.1}, {0: 1.0, 1: 1.1}).verdict == C.INDICATIVE
    # significant but one seed pair the other way: not held, not "did not hold" either
    mixed = C.SeedTest.of({0: 1.0, 1: 1.1, 2: 3.5}, {0: 3.0, 1: 3.1, 2: 3.2})
    assert mixed.in_direction == 2 and mixed.verdict == C.INCONCLUSIVE
    assert C.combine([C.HELD, C.HELD]) == C.HELD
    assert C.combine([C.HELD, C.INCONCLUSIVE]) == C.INCONCLUSIVE
    assert C.combine([C.HELD, C.NOT_HELD]) == C.NOT_HELD
    assert C.combine([C.INDICATIVE]) == C.INDICATIVE
    assert C.combine([]) == C.NOT_TESTED


def _runs(tmp_path, specs):
    return [load_run(write_run(tmp_path / name, **kw)) for name, kw in specs.items()]


def _seeded(specs, name, seeds=SEEDS, **kw):
    """``name-s`` for each seed, Kurt and W8A8 ppl a little apart per seed."""
    kurt, q = kw.pop("kurt"), kw.pop("quant", None)
    for s in seeds:
        specs[f"{name}-{s}"] = dict(kw, seed=s, kurt=kurt + 0.1 * s,
                                    quant={k: (a, b + 0.01 * s) for k, (a, b) in q.items()}
                                    if q else None)


def test_everything_held_with_four_seeds(tmp_path):
    specs = {}
    _seeded(specs, "pre", arch="pre-ln", kurt=4.0, quant={"w8a8-tensor": (5.0, 9.0)})
    _seeded(specs, "op", arch="op", kurt=2.0, val_loss=1.72, quant={"w8a8-tensor": (5.0, 5.6)})
    _seeded(specs, "op-soap", arch="op", optimizer="soap", kurt=1.2,
            quant={"w8a8-tensor": (5.0, 5.1)})
    _seeded(specs, "pre-lr", arch="pre-ln", lr=1e-3, kurt=1.5, quant={"w8a8-tensor": (5.0, 5.2)})
    _seeded(specs, "pre-eps", arch="pre-ln", eps=1e-4, kurt=1.8,
            quant={"w8a8-tensor": (5.0, 5.4)})
    runs = _runs(tmp_path, specs)
    res = {c.key: c for c in C.evaluate_claims(runs)}
    assert {k: c.verdict for k, c in res.items()} == {
        "op_vs_prenorm": C.HELD, "lower_lr": C.HELD, "larger_eps": C.HELD,
        "soap_vs_adamw": C.HELD, "kurt_vs_quant": C.HELD}
    ev = res["op_vs_prenorm"].evidence[0]
    # the numbers are the seeds' means of the final mean Kurt, not written-down values
    pre = [r for r in runs if r.name in [f"pre-{s}" for s in SEEDS]]
    assert ev["kurt_high"] == pytest.approx(np.mean([r.final_kurt_mean for r in pre]))
    assert (ev["seeds"], ev["in_direction"], ev["cell_p"]) == (4, 4, pytest.approx(1 / 16))
    assert res["op_vs_prenorm"].test["p"] == pytest.approx(1 / 16)
    # each pair names the one field that differs
    assert ev["field"] == "model preset: pre-ln → op"
    assert res["soap_vs_adamw"].evidence[0]["field"] == "optim.name: adamw → soap"
    assert res["lower_lr"].evidence[0]["field"] == "optim.lr: 0.01 → 0.001"
    assert res["larger_eps"].evidence[0]["field"] == "optim.eps: 1e-12 → 0.0001"
    assert "4 seeds" in res["op_vs_prenorm"].details[0]
    q = res["kurt_vs_quant"].evidence[0]  # one point per configuration: 5 seed means
    assert (q["n"], q["n_runs"]) == (5, 20) and q["rho"] == pytest.approx(1.0)
    assert q["p"] == pytest.approx(1 / 120)
    pre_inc = np.mean([r.quant["w8a8-tensor"].rel_increase for r in pre])
    assert max(q["rel_increase"]) == pytest.approx(pre_inc)
    assert "over 5 configurations (seed means of 20 runs" in res["kurt_vs_quant"].summary


def test_everything_did_not_hold_with_four_seeds(tmp_path):
    specs = {}
    _seeded(specs, "pre", arch="pre-ln", kurt=2.0, quant={"w8a8-tensor": (5.0, 5.5)})
    _seeded(specs, "op", arch="op", kurt=3.0, quant={"w8a8-tensor": (5.0, 5.2)})
    _seeded(specs, "op-soap", arch="op", optimizer="soap", kurt=3.5,
            quant={"w8a8-tensor": (5.0, 5.0)})
    _seeded(specs, "pre-lr", arch="pre-ln", lr=1e-3, kurt=2.5, quant={"w8a8-tensor": (5.0, 5.3)})
    _seeded(specs, "pre-eps", arch="pre-ln", eps=1e-4, kurt=2.5,
            quant={"w8a8-tensor": (5.0, 5.3)})
    res = {c.key: c for c in C.evaluate_claims(_runs(tmp_path, specs))}
    assert {k: c.verdict for k, c in res.items()} == {
        "op_vs_prenorm": C.NOT_HELD, "lower_lr": C.NOT_HELD, "larger_eps": C.NOT_HELD,
        "soap_vs_adamw": C.NOT_HELD, "kurt_vs_quant": C.NOT_HELD}
    assert "0 of 1 cell(s) in direction, 1 against" in res["op_vs_prenorm"].summary


def test_one_seed_is_indicative_only(tmp_path):
    """A single seed: the direction is shown, no verdict, and the summary says why."""
    runs = _runs(tmp_path, {"pre": dict(arch="pre-ln", kurt=5.0), "op": dict(arch="op", kurt=2.0),
                            "pre-soap": dict(arch="pre-ln", optimizer="soap", kurt=1.6)})
    res = {c.key: c for c in C.evaluate_claims(runs)}
    for key in ("op_vs_prenorm", "soap_vs_adamw"):
        assert res[key].verdict == C.INDICATIVE
        assert "1 seed(s): indicative only" in res[key].summary
        assert "lower in 1 of 1 seed pair(s)" in res[key].details[0]


def test_quant_claim_uses_its_p_value(tmp_path):
    """ρ = +1 over 3 runs is p = 1/6: inconclusive; over 4 runs p = 1/24: held."""
    def specs(n):
        return {f"r{i}": dict(arch="pre-ln", kurt=1.0 + i, lr=10.0**-i,
                              quant={"w8a8-tensor": (10.0, 10.1 + i)}) for i in range(n)}
    three = C.claim_quant(_runs(tmp_path / "3", specs(3)))
    assert three.verdict == C.INCONCLUSIVE and "p = 0.167" in three.summary
    assert C.claim_quant(_runs(tmp_path / "4", specs(4))).verdict == C.HELD


def test_quant_claim_counts_configurations_not_seeds(tmp_path):
    """Seeds of one configuration are replicates: 3 configurations × 4 seeds all in order are 3
    points (ρ = +1, p = 1/6: inconclusive), where pooling 12 runs would have said held;
    w8a8-paper (Bondarenko et al.'s sites) decides before w8a8-tensor."""
    specs = {}
    for i, arch in enumerate(("pre-ln", "op", "post-ln")):
        _seeded(specs, arch, arch=arch, kurt=2.0 + i, quant={"w8a8-tensor": (5.0, 5.1 + i),
                                                              "w8a8-paper": (5.0, 5.5 + i)})
    c = C.claim_quant(_runs(tmp_path, specs))
    assert c.verdict == C.INCONCLUSIVE and c.evidence[0]["scheme"] == "w8a8-paper"
    assert (c.evidence[0]["n"], c.evidence[0]["n_runs"]) == (3, 12)
    assert c.evidence[0]["p"] == pytest.approx(1 / 6)
    assert c.summary.startswith("w8a8-paper (Bondarenko et al.'s sites, the residual stream")


def test_quant_claim_needs_measurable_damage(tmp_path):
    specs = {f"r{i}": dict(arch="pre-ln", kurt=1.0 + i, lr=10.0**-i,
                           quant={"w8a8-tensor": (10.0, 10.0 + 0.001 * (-1) ** i),
                                  "w8a4": (10.0, 10.0 + i)}) for i in range(4)}
    c = C.claim_quant(_runs(tmp_path, specs))
    assert c.verdict == C.NOT_TESTED and "nothing to rank" in c.summary
    assert any(d.startswith("w8a4: ρ(Kurt, ppl increase) = +1.00") for d in c.details)


def test_quant_claim_ranks_at_6_bit_activations_where_int8_moves_nothing(tmp_path):
    """At CPU scale W8A8 moves no run: the claim ranks by w8a6-tensor and names that width."""
    specs = {f"r{i}": dict(arch="pre-ln", kurt=1.0 + i, lr=10.0**-i,
                           quant={"w8a8-tensor": (10.0, 10.0 + 0.001 * (-1) ** i),
                                  "w8a6-tensor": (10.0, 10.1 + 0.2 * i)}) for i in range(4)}
    c = C.claim_quant(_runs(tmp_path, specs))
    assert c.verdict == C.HELD, c.summary
    assert c.summary.startswith("w8a6-tensor: Spearman ρ = +1.00")
    assert "PROXY" in c.summary and "ranked at 6-bit activations (w8a6-tensor)" in c.summary
    assert "a 6-bit PROXY of W8A8 on linear inputs only" in c.summary
    assert c.evidence[-1]["proxy"] and not c.evidence[0]["proxy"]
    # a measurable W8A8 result still decides, whatever the 6-bit ranking says
    for i in range(4):
        specs[f"r{i}"]["quant"]["w8a8-tensor"] = (10.0, 10.1 + 0.2 * (3 - i))
    c = C.claim_quant(_runs(tmp_path / "int8", specs))
    assert c.summary.startswith("w8a8-tensor") and c.verdict == C.NOT_HELD


@pytest.mark.parametrize("hidden,value", [("model.activation", "gelu"),
                                          ("optim.weight_decay", 0.01),
                                          ("train.batch_size", 32)])
def test_runs_differing_in_a_hidden_field_are_not_paired(tmp_path, hidden, value):
    """Pairing is by the full resolved config: a field nobody looks at (an activation, the
    weight decay SOAP would bring, the batch) makes a pair untestable, and the claim names it."""
    specs = {}
    _seeded(specs, "pre", arch="pre-ln", kurt=4.0)
    _seeded(specs, "op", arch="op", kurt=2.0, extra={hidden: value})
    _seeded(specs, "soap", arch="pre-ln", optimizer="soap", kurt=1.2, extra={hidden: value})
    runs = _runs(tmp_path, specs)
    for claim in (C.claim_op_vs_prenorm(runs), C.claim_soap(runs)):
        assert claim.verdict == C.NOT_TESTED
        assert f"runs differ in {hidden}" in claim.summary, claim.summary
        assert any(d.startswith("not tested: ") and hidden in d for d in claim.details)
    # the same runs without the hidden difference are paired
    same = _runs(tmp_path / "same", {k: {**v, "extra": None} for k, v in specs.items()})
    assert C.claim_op_vs_prenorm(same).verdict == C.HELD
    assert C.claim_soap(same).verdict == C.HELD


def test_optimiser_pairs_allow_only_the_optimisers_own_hyperparameters(tmp_path):
    """SOAP's preconditioning frequency exists for SOAP only: part of the field under test.
    Betas both optimisers have must be equal."""
    specs = {}
    _seeded(specs, "adam", arch="op", kurt=2.0, extra={"optim.betas": [0.9, 0.95]})
    _seeded(specs, "soap", arch="op", optimizer="soap", kurt=1.1,
            extra={"optim.betas": [0.9, 0.95], "optim.precondition_frequency": 10})
    runs = _runs(tmp_path, specs)
    c = C.claim_soap(runs)
    assert c.verdict == C.HELD and len(c.evidence) == 1
    assert C.optimiser_keys(runs[len(SEEDS)], runs[0]) == ["optim.name",
                                                            "optim.precondition_frequency"]
    specs2 = {k: dict(v, extra={**v["extra"], "optim.betas": [0.95, 0.95]})
              if k.startswith("soap") else v for k, v in specs.items()}
    c2 = C.claim_soap(_runs(tmp_path / "b", specs2))
    assert c2.verdict == C.NOT_TESTED and "runs differ in optim.betas" in c2.summary


def test_unmatched_loss_is_flagged_not_dropped_and_diverged_runs_are_named(tmp_path):
    specs = {}
    _seeded(specs, "pre", arch="pre-ln", kurt=4.0, val_loss=1.5)
    _seeded(specs, "op", arch="op", kurt=1.5, val_loss=2.5)
    specs["post"] = dict(arch="post-ln", kurt=9.0, status="diverged")
    runs = _runs(tmp_path, specs)
    c = C.claim_op_vs_prenorm(runs)
    assert c.verdict == C.HELD and "1 cell(s) not at matched loss (flagged, counted)" in c.summary
    assert "not at matched loss: OP's loss +65.8% against Pre-Norm's" in c.details[0]
    assert any("diverged: post" in d for d in c.details)
    assert "not at matched loss" not in C.claim_op_vs_prenorm(runs, loss_tol=1.0).summary


def test_pairs_outside_the_scope_are_shown_with_their_numbers(tmp_path):
    """OP against Post-LN is no Pre-Norm comparison: listed with its numbers, not counted."""
    specs = {}
    _seeded(specs, "pre", arch="pre-ln", kurt=4.0)
    _seeded(specs, "op", arch="op", kurt=2.0)
    _seeded(specs, "post", arch="post-ln", kurt=1.2)
    c = C.claim_op_vs_prenorm(_runs(tmp_path, specs))
    assert c.verdict == C.HELD and c.test["cells"] == 1
    out = [d for d in c.details if d.startswith("outside the claim's scope")]
    assert len(out) == 1 and "post-ln adamw vs op adamw: Kurt 1.36" in out[0]
    assert "lower in 0 of 4 seed pair(s)" in out[0]


def test_no_pair_is_dropped_for_its_outcome(tmp_path):
    """Near Kurt 1 there used to be a filter (MIN_KURT) that left such pairs out: a reversal
    there now counts, and with the pairs of the other cell the main effect is tested on all."""
    specs = {}
    _seeded(specs, "pre", arch="pre-ln", kurt=1.12, lr=3e-3)
    _seeded(specs, "op", arch="op", kurt=1.30, lr=3e-3)  # the reversal, near Kurt 1
    _seeded(specs, "pre-hi", arch="pre-ln", kurt=5.0)
    _seeded(specs, "op-hi", arch="op", kurt=2.0)
    runs = _runs(tmp_path, specs)
    c = C.claim_op_vs_prenorm(runs)
    assert [e["direction"] for e in c.evidence] == ["against", "in direction"]
    assert c.test["pairs"] == 8 and c.test["cells"] == 2
    # 4 pairs at −0.18 (weight 1/4 each) and 4 at +3 (1/4 each): sum 2.82; flips ≥ it leave
    # every +3 up, any of the 16 sign patterns of the small ones: 16/256
    assert c.test["p"] == pytest.approx(16 / 256) and c.verdict == C.HELD
    low = [r for r in runs if r.lr == 3e-3]
    one = C.claim_op_vs_prenorm(low)
    assert one.verdict == C.NOT_HELD and one.test["p_other"] == pytest.approx(1 / 16)


def test_kurt_growth_removes_the_starting_offset(tmp_path):
    """Pre-LN starts at Kurt 1.4, OP at 1.1: OP ends lower (1.3 vs 1.5) but grew more
    (Kurt − Kurt₀: 0.2 vs 0.1): on growth the claim is reversed."""
    specs = {}
    _seeded(specs, "pre", arch="pre-ln", kurt=1.5, held_out=1.5, init=1.4)
    _seeded(specs, "op", arch="op", kurt=1.3, held_out=1.3, init=1.1)
    runs = _runs(tmp_path, specs)
    r = next(r for r in runs if r.name == "op-0")
    assert r.kurt_growth == pytest.approx(1.3 - 1.1)
    c = C.claim_op_vs_prenorm(runs)
    assert c.test["outcome"] == "kurt_growth" and c.summary.startswith("Kurt growth")
    assert c.verdict == C.NOT_HELD and c.evidence[0]["kurt_high"] > c.evidence[0]["kurt_low"]
    # without step 0 the final Kurt decides, and the summary says which outcome it used
    plain = _runs(tmp_path / "plain", {k: {**v, "init": None} for k, v in specs.items()})
    c2 = C.claim_op_vs_prenorm(plain)
    assert c2.test["outcome"] == "final_kurt_mean" and c2.verdict == C.HELD
    assert "no step-0 Kurt" in c2.summary


def test_final_kurtosis_is_the_held_out_value(tmp_path):
    """The verdicts use Kurt on the validation windows at the last step when the run logged
    it, not the last training batch."""
    r = load_run(write_run(tmp_path / "a", kurt=3.0, held_out=2.5))
    assert r.held_out and r.final_kurt_mean == pytest.approx(2.5)
    assert r.kurt_mean_series[-1] == pytest.approx(3.0, abs=0.02)
    assert r.final_kurt_max == pytest.approx(1 + 1.5 * 1.4)
    plain = load_run(write_run(tmp_path / "b", kurt=3.0))
    assert not plain.held_out and plain.final_kurt_mean == pytest.approx(
        plain.kurt_mean_series[-1], rel=1e-12)
    assert plain.final_kurt_mean == RunFolder(plain.path).metrics[-1]["kurtosis_mean"]
    assert (r.final_kurt.source, plain.final_kurt.source) == ("held-out eval", "last train batch")


def _ablation_runs(tmp_path, entropy_noqk=None, diverge=False):
    specs = {}
    _seeded(specs, "op", arch="op", kurt=3.0, entropy=2.0)
    _seeded(specs, "op-nofinal", arch="op-nofinal", kurt=1.6)
    _seeded(specs, "op-noqk", arch="op", kurt=2.5, entropy=entropy_noqk,
            status="diverged" if diverge else "finished",
            extra={"model.qk_norm": False, "model.allow_unregulated": True})
    _seeded(specs, "pre", arch="pre-ln", kurt=5.0, cos_sim=0.6)
    _seeded(specs, "pre-beta", arch="pre-ln", kurt=2.0, cos_sim=0.2, extra={"model.beta": 0.2})
    return _runs(tmp_path, specs)


def test_ablations_final_norm_qk_norm_and_small_beta(tmp_path):
    runs = _ablation_runs(tmp_path, entropy_noqk=0.1)
    res = {c.key: c for c in C.evaluate_claims(runs)}
    assert res["op_final_norm"].verdict == C.HELD
    assert res["op_final_norm"].evidence[0]["field"] == "model.final_norm: True → False"
    assert res["qk_norm"].verdict == C.HELD
    assert res["qk_norm"].evidence[0]["field"] == "model.qk_norm: True → False"
    assert res["small_beta"].verdict == C.HELD
    assert res["small_beta"].evidence[0]["field"] == "model.beta: 1.0 → 0.2"
    assert any("token cos-sim 0.60" in d for d in res["small_beta"].details)
    # the ablation runs are not Pre-Norm or OP for the main claim
    op = res["op_vs_prenorm"]
    assert [e["field"] for e in op.evidence] == ["model preset: pre-ln → op"]
    assert {r.arch for r in runs} == {"op", "op-nofinal", "op-noqk", "pre-ln", "pre-ln β=0.2"}


def test_qk_norm_ablation_diverged_or_not_logged(tmp_path):
    div = C.claim_qk_norm(_ablation_runs(tmp_path / "d", diverge=True))
    assert div.verdict == C.HELD and "4 of 4 seed(s) diverged" in div.details[0]
    quiet = C.claim_qk_norm(_ablation_runs(tmp_path / "q"))  # finished, no entropy logged
    assert quiet.verdict == C.NOT_TESTED and "attention entropy not logged" in quiet.summary
    assert quiet.summary.startswith("0 of 4 run(s) without QK-norm diverged")
    same = C.claim_qk_norm(_ablation_runs(tmp_path / "s", entropy_noqk=2.5))
    assert same.verdict == C.NOT_HELD


def test_ablations_are_left_out_without_their_runs(tmp_path):
    runs = _runs(tmp_path, {"pre": dict(arch="pre-ln", kurt=5.0)})
    assert [c.key for c in C.evaluate_claims(runs)] == [
        "op_vs_prenorm", "lower_lr", "larger_eps", "soap_vs_adamw", "kurt_vs_quant"]


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


def test_shampoo_against_adafactor_the_second_optimiser_pair(tmp_path):
    """Rotated AdaFactor (Shampoo) against AdaFactor: held with 3 seeds in direction, did not
    hold the other way, and paired on the optimiser only."""
    specs = {}
    _seeded(specs, "fac", arch="pre-ln", optimizer="adafactor", kurt=3.0)
    _seeded(specs, "sha", arch="pre-ln", optimizer="shampoo", kurt=1.4,
            extra={"optim.precondition_frequency": 10})
    c = C.claim_shampoo(_runs(tmp_path, specs))
    assert c.verdict == C.HELD, c.summary
    assert c.evidence[0]["field"] == "optim.name: adafactor → shampoo"
    specs = {}
    _seeded(specs, "fac", arch="pre-ln", optimizer="adafactor", kurt=1.4)
    _seeded(specs, "sha", arch="pre-ln", optimizer="shampoo", kurt=3.0,
            extra={"optim.precondition_frequency": 10})
    assert C.claim_shampoo(_runs(tmp_path / "against", specs)).verdict == C.NOT_HELD
