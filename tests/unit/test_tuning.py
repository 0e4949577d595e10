"""The lr choice of a tuning sweep (issue 23, experiments/tuning.py): own lr, shared lr, the
refusal of test seeds, and tuning.md/.json."""

import json

import pytest

from outlierlab.experiments import tuning as T
from outlierlab.experiments.results import load_run
from run_fixtures import write_run

# seed-mean final val loss per (configuration, lr): the fixture's final val loss is val_loss+0.02
LOSSES = {("pre-ln", "adamw"): {1e-3: 2.50, 3e-3: 2.40, 1e-2: 2.60},
          ("op", "adamw"): {1e-3: 2.48, 3e-3: 2.42, 1e-2: 2.30},
          ("pre-ln", "soap"): {1e-3: 2.20, 3e-3: 2.21, 1e-2: 2.40}}


def _sweep(tmp_path, seeds=(100, 101), losses=LOSSES, diverge=()):
    runs = []
    for (arch, opt), by_lr in losses.items():
        for lr, loss in by_lr.items():
            for s in seeds:
                status = "diverged" if (arch, opt, lr, s) in diverge else "finished"
                runs.append(load_run(write_run(
                    tmp_path / f"{arch}-{opt}-{lr:g}-{s}", arch=arch, optimizer=opt, lr=lr,
                    seed=s, val_loss=loss - 0.02 + 0.01 * (s - seeds[0]), kurt=2.0 + 10 * lr,
                    held_out=2.0 + 10 * lr, init=1.3, status=status)))
    return runs


def test_own_and_shared_lr_by_the_rule(tmp_path):
    t = T.choose_lrs(_sweep(tmp_path))
    own = {c.label: c.own_lr for c in t.configurations}
    assert own == {"pre-ln adamw": 3e-3, "op adamw": 1e-2, "pre-ln soap": 1e-3}
    # at 1e-2 Pre-LN AdamW is 8 % above its best; at 3e-3 OP is +5.2 %; at 1e-3 OP +7.8 %:
    assert t.shared_lr is None and "none" in t.shared_why and "lr 0.003: +5.2% (op adamw)" \
        in t.shared_why
    # the nearest shared lr: worst gaps 1e-3 +7.8 %, 3e-3 +5.2 % (op adamw), 1e-2 +8.3 %
    assert t.nearest_lr == 3e-3 and t.nearest_worst == "op adamw"
    assert t.nearest_gap == pytest.approx(2.425 / 2.305 - 1)  # seed means: +0.005
    # with a 6 % tolerance 3e-3 is the largest lr within it for all three, and the nearest
    t6 = T.choose_lrs(_sweep(tmp_path / "b"), tolerance=0.06)
    assert t6.shared_lr == t6.nearest_lr == 3e-3
    assert "op adamw: own lr 0.01 is the largest lr tried; its best may lie beyond the grid" \
        in t.notes and "pre-ln soap: own lr 0.001 is the smallest lr tried" in " ".join(t.notes)
    pre = next(c for c in t.configurations if c.label == "pre-ln adamw").at(3e-3)
    assert pre.loss == pytest.approx(2.405) and pre.seeds == [100, 101]
    assert pre.kurt == pytest.approx(2.03, abs=0.02) and pre.growth > 0


def test_a_diverged_seed_makes_its_lr_unchoosable(tmp_path):
    runs = _sweep(tmp_path, diverge={("op", "adamw", 1e-2, 101)})
    t = T.choose_lrs(runs)
    op = next(c for c in t.configurations if c.label == "op adamw")
    assert op.own_lr == 3e-3 and op.at(1e-2).diverged == 1 and op.at(1e-2).loss == float("inf")


def test_test_seeds_never_choose(tmp_path):
    runs = _sweep(tmp_path, seeds=(2, 100))
    with pytest.raises(T.TuningError, match=r"seed.s. 2 .*allowed: tuning seeds ≥ 100"):
        T.choose_lrs(runs)
    assert not T.is_tuning_sweep(runs)
    assert T.is_tuning_sweep([r for r in runs if r.seed == 100])
    assert T.mixed_seeds_note(runs).startswith("no lr chosen: the runs mix tuning seeds (100) "
                                               "with seed(s) 2; settings are chosen on tuning")
    assert T.mixed_seeds_note([r for r in runs if r.seed == 100]) == ""


def test_tuning_files_round_trip_and_match_test_runs(tmp_path):
    t = T.choose_lrs(_sweep(tmp_path), tolerance=0.06)
    md, js = T.write_tuning(t, tmp_path / "rep")
    text = md.read_text()
    assert "**Shared lr: 0.003**" in text and "| pre-ln adamw |" in text and "(+8.3%)" in text
    back = T.Tuning.load(js)
    assert back.shared_lr == 3e-3 and json.loads(js.read_text())["rule"].startswith("own lr")
    assert back.nearest_lr == 3e-3 and back.nearest_gap == pytest.approx(t.nearest_gap)
    assert "Nearest shared lr" not in text  # only said when there is no shared lr
    strict = T.choose_lrs(_sweep(tmp_path / "c"))
    assert "**Shared lr: none**" in T.markdown(strict) and \
        "**Nearest shared lr: 0.003** — the common lr of smallest worst gap to a configuration's "\
        "best loss (+5.2%, op adamw)" in T.markdown(strict)
    test_run = load_run(write_run(tmp_path / "test-op", arch="op", lr=5e-3, seed=0))
    assert back.own_lr(test_run) == 1e-2
    other = load_run(write_run(tmp_path / "test-wd", arch="op", seed=0,
                               extra={"optim.weight_decay": 0.0}))
    assert back.own_lr(other) is None
    assert back.differences(other) == ["optim.weight_decay"] and back.differences(test_run) == []
    with pytest.raises(T.TuningError, match=r"not a tuning\.json"):
        T.Tuning.load(md)
