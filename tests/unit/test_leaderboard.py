"""The mitigations leaderboard (issue 25) on synthetic run folders: the ranking, the paired
p-values against a hand count of the sign flips, Kurt growth by hand, step time, sinks,
and a scheme a run was not quantised with shown as missing (never as 0)."""

from __future__ import annotations

import json

import pytest

from outlierlab.experiments.leaderboard import (
    BASELINE,
    has_mitigations,
    leaderboard,
    method_label,
    table,
    write_leaderboard,
)
from outlierlab.experiments.report import write_report
from outlierlab.experiments.results import load_runs
from outlierlab.run_folder import RunFolder
from run_fixtures import write_run

BASE_K = (6.0, 6.1, 6.2)
QUANT_ALL = {"w8a8-tensor": (10.0, 10.1), "w6a6-tensor": (10.0, 11.0),
             "w4a4-online": (10.0, 20.0)}


def _profile(mass: float, ratio: float) -> dict:
    return {"profile": {
        "points": [{"name": "blocks.0.resid_post", "max_median_ratio": ratio / 2},
                   {"name": "blocks.1.resid_post", "max_median_ratio": ratio}],
        "attention": [{"layer": "blocks.0.attn", "mass_token0": mass - 0.1},
                      {"layer": "blocks.1.attn", "mass_token0": mass + 0.1}]}}


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for seed in range(3):
        write_run(root / f"base-seed{seed}", seed=seed, held_out=BASE_K[seed], quant=QUANT_ALL,
                  measured=_profile(0.6, 300.0))
        # softpick: lower than the baseline in every seed; W6A6 never run, W4A4 in 2 of 3
        q = {"w8a8-tensor": (10.0, 10.05)}
        if seed < 2:
            q["w4a4-online"] = (10.0, 12.0)
        write_run(root / f"softpick-seed{seed}", seed=seed, held_out=2.0 + 0.1 * seed, quant=q,
                  extra={"model.attn": "softpick"}, measured=_profile(0.2, 20.0))
        # gated (element): lower in 2 of 3 seed pairs (seed 1: 6.15 > 6.1); never measured
        write_run(root / f"gate-seed{seed}", seed=seed, held_out=(4.0, 6.15, 5.0)[seed],
                  extra={"model.attn_gate": "elem"})
        # OP: the lowest Kurt, half the tokens per second
        write_run(root / f"op-seed{seed}", arch="op", seed=seed, held_out=1.5 + 0.01 * seed,
                  tokens_per_s=4000.0)
    write_run(root / "tweo-seed0", seed=0, held_out=3.0, extra={"train.tweo_weight": 1e-4})
    write_run(root / "softpick-crashed", seed=3, status="crashed", held_out=9.0,
              extra={"model.attn": "softpick"})
    write_run(root / "softpick-diverged", seed=4, status="diverged",
              extra={"model.attn": "softpick"})
    runs, _ = load_runs([root])
    return runs


def test_methods_are_ranked_by_final_kurt_with_their_seeds(sweep):
    entries = leaderboard(sweep)
    assert [e.method for e in entries] == ["op adamw", "pre-ln+softpick adamw",
                                           "pre-ln+tweo adamw", "pre-ln+gate-elem adamw",
                                           BASELINE]
    assert [len(e.runs) for e in entries] == [3, 3, 1, 3, 3]  # crashed, diverged left out
    assert [e.diverged for e in entries] == [0, 1, 0, 0, 0]
    _, rows = table(entries)
    assert rows[1][2] == "3 (+1 diverged)"
    soft = entries[1]
    assert soft.mean("kurt_final") == pytest.approx(2.1)
    assert has_mitigations(sweep)
    assert not has_mitigations([r for r in sweep if method_label(r) == BASELINE])


def test_pairs_against_the_baseline_match_a_hand_count_of_the_sign_flips(sweep):
    by = {e.method: e for e in leaderboard(sweep)}
    # softpick 2.0, 2.1, 2.2 v baseline 6.0, 6.1, 6.2: d = 4, 4, 4; of the 2³ sign flips only
    # the observed one has a mean ≥ 4 → p = 1/8
    t = by["pre-ln+softpick adamw"].tests["kurt_final"]
    assert (t.pairs, t.in_direction, t.against) == (3, 3, 0)
    assert t.p == pytest.approx(1 / 8)
    # gate 4.0, 6.15, 5.0: d = 2.0, −0.05, 1.2, sum 3.15; flips with a sum ≥ 3.15: the observed
    # one and +2.0 +0.05 +1.2 = 3.25 → p = 2/8; seed 1 is against
    t = by["pre-ln+gate-elem adamw"].tests["kurt_final"]
    assert (t.pairs, t.in_direction, t.against) == (3, 2, 1)
    assert t.p == pytest.approx(2 / 8)
    # one TWEO seed (seed 0: 3.0 v 6.0): one pair, p = 1/2
    assert by["pre-ln+tweo adamw"].tests["kurt_final"].p == pytest.approx(1 / 2)
    assert by[BASELINE].tests == {}


def test_kurt_growth_is_the_increase_over_the_first_measured_value(sweep):
    run = next(r for r in sweep if r.name == "softpick-seed1")
    rows = RunFolder(run.path).metrics
    first = next(r["kurtosis_mean"] for r in rows if "kurtosis_mean" in r)
    final = rows[-1]["val_kurtosis_mean"]
    assert final == pytest.approx(2.1)
    assert run.kurt_growth == pytest.approx(final - first)


def test_a_missing_scheme_is_missing_not_zero_and_partial_seeds_are_counted(sweep, tmp_path):
    entries = leaderboard(sweep)
    header, rows = table(entries)
    row = dict(zip(header, next(r for r in rows if r[1] == "pre-ln+softpick adamw")))
    assert row["W6A6 damage"] == "missing"
    assert row["W4A4 rot. damage"] == "+20.00% (2 of 3)"
    assert row["W8A8 damage"] == "+0.50%"
    assert row["first-token attn."] == "20.0%"  # mean over layers of the token-0 mass
    assert row["max|x|/median"] == "20.0"  # the largest over the points
    from outlierlab.experiments.tables import md_table

    assert "| max\\|x\\|/median |" in md_table(header, rows)  # escaped once, one column
    gate = dict(zip(header, next(r for r in rows if r[1] == "pre-ln+gate-elem adamw")))
    assert gate["first-token attn."] == "missing" and gate["W8A8 damage"] == "missing"
    op = next(e for e in entries if e.method == "op adamw")
    assert op.step_time == pytest.approx(2.0)  # half the tokens per second of the baseline
    _, paths = write_leaderboard(sweep, tmp_path / "lb", command="outlierlab report X")
    data = json.loads(paths["json"].read_text())
    soft = next(e for e in data["entries"] if e["method"] == "pre-ln+softpick adamw")
    assert soft["mean"]["damage_w6a6-tensor"] is None  # null in JSON, not 0
    assert soft["by_seed"]["damage_w4a4-online"]["2"] is None
    assert soft["vs_baseline"]["kurt_final"]["p_lower"] == pytest.approx(1 / 8)
    assert "damage_w6a6-tensor" not in soft["vs_baseline"]
    assert paths["png"].stat().st_size > 1000
    assert "`outlierlab report X`" in paths["md"].read_text()


def test_the_report_adds_the_leaderboard_only_for_mitigation_runs(sweep, tmp_path):
    rep = write_report(sweep, tmp_path / "rep", command="outlierlab report sweep")
    assert (tmp_path / "rep" / "leaderboard.png").is_file()
    assert "## Mitigations leaderboard" in rep.markdown.read_text()
    assert "Mitigations leaderboard" in rep.html.read_text()
    base_only = [r for r in sweep if method_label(r) == BASELINE]
    write_report(base_only, tmp_path / "plain")
    assert not (tmp_path / "plain" / "leaderboard.md").exists()


def test_a_run_found_twice_counts_once(tmp_path):
    """The baseline of two sweep folders (each part of a split grid run into its own folder,
    then `outlierlab report A B`): one run per method and seed in the means and the pairs, the
    repeats named in the seeds column."""
    for part, (method, k) in {"a": ("softpick", 2.0), "b": ("clipped", 4.0)}.items():
        for seed in range(3):
            write_run(tmp_path / part / f"base-seed{seed}", seed=seed, held_out=BASE_K[seed])
            write_run(tmp_path / part / f"{method}-seed{seed}", seed=seed, held_out=k,
                      extra={"model.attn": method})
    runs, _ = load_runs([tmp_path / "a", tmp_path / "b"])
    entries = leaderboard(runs)
    base = next(e for e in entries if e.method == BASELINE)
    assert (len(base.runs), base.repeats, sorted(base.seeds)) == (3, 3, [0, 1, 2])
    assert base.mean("kurt_final") == pytest.approx(6.1)
    clipped = next(e for e in entries if e.method == "pre-ln+clipped adamw")
    assert clipped.tests["kurt_final"].pairs == 3 and clipped.repeats == 0
    _, rows = table(entries)
    assert rows[-1][1:3] == [BASELINE, "3 (3 repeated seed(s) left out)"]
