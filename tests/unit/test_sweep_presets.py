"""The shipped sweep presets pair runs in one field: every point of `quick` and `cpu` is
resolved as `outlierlab train` would, turned into a run record with a made-up Kurt, and the
claims must find each comparison they are meant to test with exactly the field under test
differing (no "not tested: runs differ in X")."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from outlierlab import config
from outlierlab.experiments import claims as C
from outlierlab.experiments.grid import load_grid
from outlierlab.experiments.report import lr_claim_sets, own_lr_runs
from outlierlab.experiments.results import RunRecord
from outlierlab.experiments.tuning import Tuning


def _kurt(cfg: dict) -> float:
    """A Kurt every claim agrees with: lower for OP, SOAP, Shampoo, low lr, large ε, no final norm,
    small β, and a touch per seed."""
    m, o = cfg["model"], cfg["optim"]
    k = 6.0
    k *= 0.5 if m["block"] == "op" else 1.0
    k *= 0.5 if o["name"] in ("soap", "shampoo") else 1.0
    k *= (o["lr"] / 1e-2) ** 0.2 if o.get("lr") else 1.0
    k *= 1.0 - 0.05 * (12 + math.log10(o["eps"])) if o.get("eps") else 1.0
    k *= 0.8 if not m["final_norm"] and m["block"] == "op" else 1.0
    k *= 0.5 if m["block"] == "pre" and m["beta"] != 1.0 else 1.0
    return 1.0 + k + 0.01 * cfg["train"]["seed"]


def records(preset: str, data: dict | None = None) -> list[RunRecord]:
    """Every point of ``preset`` as a finished run record with a made-up Kurt (:func:`_kurt`);
    ``data``: a tuning configuration's key, whose data fingerprint and vocabulary size (what a
    real run records of its corpus) the records take."""
    grid = load_grid(preset)
    out = []
    for p in grid.points:
        cfg = config.load(grid.preset, None, p.args()).to_dict()
        if data is not None:
            cfg["model"]["vocab_size"] = data["model.vocab_size"]
        k, steps = _kurt(cfg), cfg["train"]["steps"]
        diverged = cfg["model"]["block"] == "op" and not cfg["model"]["qk_norm"]
        out.append(RunRecord(path=Path(p.name), config=cfg, step=steps,
                             status="diverged" if diverged else "finished",
                             finals={"val_kurtosis_mean": (steps, k),
                                     "val_kurtosis_max": (steps, 2 * k),
                                     "val_loss": (steps, 2.0)}, last_step=steps,
                             data_fingerprint=None if data is None else data["data_fingerprint"]))
    return out


def _fields(claim: C.Claim) -> set[str]:
    return {e["field"].split(":")[0] for e in claim.evidence if "field" in e}


def test_quick_pairs_differ_in_one_field_at_own_lrs():
    """quick runs each configuration at its own lr (quick-tuning's choice): its claims pair
    across lrs (own_lr_runs), two cells of 3 test seeds each, so they can hold."""
    grid = load_grid("quick")
    assert grid.own_lr_from == "quick-tuning" and grid.seeds == "test"
    runs = records("quick")
    assert len(runs) == 12 and {r.seed for r in runs} == {0, 1, 2}
    res = {c.key: c for c in C.evaluate_claims(own_lr_runs(runs))}
    assert _fields(res["op_vs_prenorm"]) == {"model preset"}
    assert _fields(res["soap_vs_adamw"]) == {"optim.name"}
    assert len(res["op_vs_prenorm"].evidence) == len(res["soap_vs_adamw"].evidence) == 2
    for key in ("op_vs_prenorm", "soap_vs_adamw"):
        assert not any(d.startswith("not tested: ") for d in res[key].details), res[key].details
        assert res[key].verdict == C.HELD  # 6 same-seed pairs all one way: p = 1/64


def test_cpu_pairs_differ_in_one_field_and_can_hold():
    """The whole cpu (its four parts): at equal lrs every claim finds cells differing in its
    field alone, and with 3 seeds a claim of two cells or more can hold."""
    grid = load_grid("cpu")
    assert grid.parts == ("cpu-own", "cpu-shared", "cpu-trends", "cpu-ablations")
    assert grid.tuning == "healthy-lr"
    assert [len(load_grid(p).points) for p in grid.parts] == [18, 15, 21, 21]
    runs = records("cpu")
    assert len(runs) == 75 and {r.seed for r in runs} == {0, 1, 2}
    assert {r.config["train"]["steps"] for r in runs} == {1000}
    res = {c.key: c for c in C.evaluate_claims(runs)}
    expected = {"op_vs_prenorm": {"model preset"}, "lower_lr": {"optim.lr"},
                "larger_eps": {"optim.eps"}, "soap_vs_adamw": {"optim.name"},
                "shampoo_vs_adafactor": {"optim.name"},
                "op_final_norm": {"model.final_norm"}, "qk_norm": {"model.qk_norm"},
                "small_beta": {"model.beta"}}
    for key, fields in expected.items():
        assert _fields(res[key]) == fields, key
        # at equal lrs, Pre-LN Shampoo's and AdaFactor's own lrs (2e-2, 3e-3) do not pair:
        # said so, and left to the own-lr claims
        untested = [d for d in res[key].details if d.startswith("not tested: ")]
        allowed = ["not tested: pre-ln adafactor vs pre-ln shampoo: runs differ in optim.lr"]
        assert untested == (allowed if key == "shampoo_vs_adafactor" else []), untested
        # one cell of 3 seeds cannot reach p ≤ 0.1 (p ≥ 1/8); the QK-norm ablation is a
        # rank-sum test per pair (3 v 3: p = 1/20)
        single = key in ("op_final_norm", "small_beta")
        want = C.INCONCLUSIVE if single else C.HELD
        assert res[key].verdict == want, (key, res[key].summary)
    # at lr 1e-2: OP against Pre-LN, Pre-RMS, Pre-SRMS with AdamW, against Pre-LN with SOAP,
    # AdaFactor, Shampoo and at ε 1e-6, 1e-4; with AdamW at lr 1e-3 and 3e-3: 10 cells
    assert len(res["op_vs_prenorm"].evidence) == 3 + 3 + 2 + 2
    # SOAP and Shampoo pairs at lr 1e-2, both blocks
    assert len(res["soap_vs_adamw"].evidence) == 2
    assert len(res["shampoo_vs_adafactor"].evidence) == 2


def test_cpu_runs_each_tuned_configuration_at_its_own_and_the_nearest_shared_lr():
    """The shipped healthy-lr choice covers cpu's eight (block, optimiser) configurations: each
    runs at its own lr and at the nearest shared lr, so the report's two claim sets (own lrs,
    paired across lrs; the shared lr) each find the three optimiser/block claims in two cells."""
    tuning = Tuning.load("healthy-lr")
    assert tuning.seeds == [100, 101] and tuning.shared_lr is None and tuning.nearest_lr == 1e-2
    runs = records("cpu", data=tuning.configurations[0].key)
    for c in tuning.configurations:
        lrs = {r.lr for r in runs if tuning.own_lr(r) == c.own_lr
               and (r.arch, r.optimizer) == tuple(c.label.split())}
        assert {c.own_lr, tuning.nearest_lr} <= lrs, c.label
    sets, notes = lr_claim_sets(runs, tuning)
    (shared_head, shared), (own_head, own) = sets.items()
    assert shared_head.startswith("Claims at the nearest shared lr 0.01")
    assert own_head.startswith("Claims at each configuration's own lr")
    for claims in (shared, own):
        res = {c.key: c for c in claims}
        for key, field in (("op_vs_prenorm", "model preset"), ("soap_vs_adamw", "optim.name"),
                           ("shampoo_vs_adafactor", "optim.name")):
            assert _fields(res[key]) == {field}, key
            assert len(res[key].evidence) >= 2 and res[key].verdict == C.HELD, key
    # the blocks, ablations and Muon are not tuned configurations: said so
    assert any("configurations the tuning did not cover" in n for n in notes)


@pytest.mark.parametrize("preset", ["quick", "cpu", "gpu-130m", "mitigations"])
def test_adamw_and_soap_share_their_hyperparameters(preset):
    """The optimiser pair the paper contrasts runs at the same lr, betas, ε, wd, schedule."""
    own = load_grid(preset).own_lr_from is not None  # each at its own lr: pair across lrs
    runs = {(r.arch, r.optimizer, None if own else r.lr, r.eps): r for r in records(preset)}
    for (arch, name, lr, eps), soap in runs.items():
        if name != "soap":
            continue
        adam = runs[(arch, "adamw", lr, eps)]
        if own:
            adam, soap = own_lr_runs([adam, soap])
        assert C.optimiser_keys(adam, soap) == [
            "optim.name", "optim.max_precond_dim", "optim.precondition_frequency"]
        assert C.config_diff(adam, soap, C.optimiser_keys(adam, soap)) == []


def test_mitigations_applies_each_method_alone_to_the_baseline():
    """Every method of docs/mitigations.md on Pre-LN + AdamW at the quick anchor, differing from
    that baseline in the method's own fields only; the recipes and OP references beside."""
    runs = records("mitigations")
    assert len(runs) == 51 and {r.seed for r in runs} == {0, 1, 2}
    base = next(r for r in runs if r.arch == "pre-ln" and r.optimizer == "adamw"
                and r.flat.get("train.tweo_weight") == 0 and r.seed == 0)
    anchor = next(r for r in records("cpu") if (r.arch, r.optimizer, r.lr, r.eps, r.seed)
                  == ("pre-ln", "adamw", 1e-2, 1e-12, 0))
    # the cpu preset's anchor (the quick preset's setting until issue 23 moved quick to its
    # own lrs) at 300 steps (cpu moved to healthy-lr's 1000 steps, evaluated and checkpointed
    # every 100 and 500), and for its validation set (issue 23: 256 windows across 60
    # documents of a 10 % split; the mitigations sweep kept the 32 first windows of 5 %)
    assert C.config_diff(base, anchor, ("train.eval_windows", "train.eval_docs",
                                        "data.val_fraction", "train.steps")) == []
    assert base.config["train"]["steps"] == 300
    want = {
        frozenset({"model.attn"}): 4,  # softmax1, softpick, clipped; orthoadam+softmax1 below
        frozenset({"model.attn_gate"}): 2,
        frozenset({"model.attn_bias_kv"}): 1,
        frozenset({"train.tweo_weight"}): 1,
        frozenset({"model.norm"}): 1,
        frozenset({"model.embed_proj"}): 1,
    }
    seen: dict[frozenset, int] = {}
    for r in (r for r in runs if r.seed == 0 and r is not base):
        diff = frozenset(C.config_diff(base, r))
        seen[diff] = seen.get(diff, 0) + 1
    for fields, n in want.items():
        assert seen.get(fields, 0) >= n - (fields == frozenset({"model.attn"})), (fields, seen)
    labels = {(r.arch, r.optimizer) for r in runs}
    assert {("pre-ssnorm+embproj", "muon"), ("pre-ln", "orthoadam"),
            ("pre-ln+softmax1", "orthoadam"), ("op", "soap"), ("op", "adamw"),
            ("op+gate-elem", "adamw"), ("pre-ln+softpick", "adamw"),
            ("pre-ln+kv-bias", "adamw")} <= labels
    orth = next(r for r in runs if (r.arch, r.optimizer, r.seed) == ("pre-ln", "orthoadam", 0))
    # the adam family shares lr, betas, ε, wd (max_precond_dim: orthoadam's own, as SOAP's)
    assert C.config_diff(base, orth) == ["optim.max_precond_dim", "optim.name"]
