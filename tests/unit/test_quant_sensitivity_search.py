"""The verified 16-bit search (:func:`outlierlab.quant.sensitivity._recommend`) and the linears'
ranking (:func:`~outlierlab.quant.sensitivity._ranking`) on damage functions D(S) whose answer is
known, non-additive ones included: the search's verdict comes from evaluations of D, never from
adding up the ranking's scores."""

from __future__ import annotations

import itertools
import math

import pytest

from outlierlab.quant.sensitivity import MAX_VERIFY, _ranking, _recommend, _top_blocks

NAMES = [f"L{i}" for i in range(10)]


def verifier(damage):
    """verify(keep) → {"kl", "ppl"} for D(every linear but ``keep``), counting the calls."""
    calls = []

    def verify(keep):
        calls.append(list(keep))
        kl = damage(set(NAMES) - set(keep))
        return {"kl": kl, "ppl": math.exp(kl)}

    return verify, calls


def test_two_linears_that_only_hurt_together_are_found_by_verification():
    # L8 and L9 do nothing alone but 1.0 nats together; every other linear 0.01 alone, additive
    def damage(s):
        return 0.01 * len(s - {"L8", "L9"}) + (1.0 if {"L8", "L9"} <= s else 0.0)

    full = damage(set(NAMES))
    # ranked by damage alone: the pair scores 0 and comes last
    ranking = sorted(((n, damage({n})) for n in NAMES), key=lambda kv: -kv[1])
    assert [n for n, _ in ranking[-2:]] == ["L8", "L9"]
    verify, calls = verifier(damage)
    rec = _recommend(verify, full, ranking, 0.9)
    # the summed scores of the first 8 predict 7 % recovered; the search does not trust them
    assert rec["reached"] and rec["verified_recovery"] >= 0.9
    assert rec["verified_kl"] == pytest.approx(damage(set(NAMES) - set(rec["keep_16bit"])))
    assert {"L8", "L9"} & set(rec["keep_16bit"])  # one of the pair kept breaks it
    assert len(rec["keep_16bit"]) == 9  # the shortest prefix of this ranking that reaches 90 %
    assert rec["predicted_recovery"] < 0.1  # what adding up the ranking would have said
    assert rec["verifications"] == len(calls) <= MAX_VERIFY
    assert [h["keep"] for h in rec["history"]] == [1, 2, 4, 8, 10, 9]  # doubling, then bisection


def test_overlapping_damage_needs_more_than_the_prediction():
    # L0..L2 share one source of damage (any of them quantised costs 0.6, not 0.6 each):
    # keeping one or two of them recovers nothing, and the summed scores overshoot
    def damage(s):
        return (0.6 if s & {"L0", "L1", "L2"} else 0.0) + 0.04 * len(s - {"L0", "L1", "L2"})

    full = damage(set(NAMES))
    ranking = [(n, damage({n})) for n in NAMES]
    verify, _ = verifier(damage)
    rec = _recommend(verify, full, ranking, 0.9)
    assert rec["reached"] and rec["verified_recovery"] >= 0.9
    # brute force: the shortest prefix of the ranking whose real recovery reaches 90 %
    want = next(k for k in range(len(NAMES) + 1)
                if full - damage(set(NAMES[k:])) >= 0.9 * full)  # fmt: skip
    assert len(rec["keep_16bit"]) == want == 8
    assert rec["predicted_recovery"] > 2  # 3 × 0.6 + 5 × 0.04 of 0.88


@pytest.mark.parametrize("n", [1, 7, 10])
def test_additive_damage_gives_the_shortest_prefix(n):
    names = NAMES[:n]
    alone = {x: 2.0 ** -i for i, x in enumerate(names)}

    def damage(s):
        return sum(alone[x] for x in s)

    full = damage(set(names))
    calls = []

    def verify(keep):
        calls.append(keep)
        return {"kl": damage(set(names) - set(keep)), "ppl": 1.0}

    rec = _recommend(verify, full, list(alone.items()), 0.9)
    want = next(k for k in range(n + 1) if full - damage(set(names[k:])) >= 0.9 * full)
    assert len(rec["keep_16bit"]) == want and rec["reached"]
    assert rec["predicted_recovery"] == pytest.approx(rec["verified_recovery"])  # additive
    assert len(calls) <= 2 * math.ceil(math.log2(n + 1)) + 1


def test_out_of_evaluations_says_so_and_keeps_the_best_verified_set():
    def damage(s):
        return 1.0 if "L9" in s else 0.0  # only the last-ranked linear matters

    verify, calls = verifier(damage)
    rec = _recommend(verify, 1.0, [(n, 1.0 - i / 10) for i, n in enumerate(NAMES)], 0.9,
                     max_verify=3)  # fmt: skip
    assert not rec["reached"] and len(calls) == 3
    assert rec["verified_recovery"] == 0.0 and len(rec["keep_16bit"]) == 1


def test_nothing_to_recover_keeps_nothing():
    verify, calls = verifier(lambda s: 0.0)
    rec = _recommend(verify, 0.0, [(n, 0.0) for n in NAMES], 0.9)
    assert rec["keep_16bit"] == [] and rec["reached"] and calls == []


def test_ranking_shares_a_blocks_unexplained_damage_by_noise():
    groups = {"blocks.0": ["a", "b", "c"], "blocks.1": ["d", "e"]}
    blocks = [{"name": "blocks.0", "alone_kl": 0.5}, {"name": "blocks.1", "alone_kl": 0.2}]
    layers = [{"name": "a", "alone_kl": 0.1}, {"name": "b", "alone_kl": 0.0},
              {"name": "c", "alone_kl": -0.01}]  # blocks.0 searched; fmt: skip
    stats = [{"name": "a", "act_sqnr_db": 30.0, "weight_sqnr_db": None},
             {"name": "b", "act_sqnr_db": 10.0, "weight_sqnr_db": None},
             {"name": "c", "act_sqnr_db": 20.0, "weight_sqnr_db": None},
             {"name": "d", "act_sqnr_db": 20.0, "weight_sqnr_db": 20.0},
             {"name": "e", "act_sqnr_db": 20.0, "weight_sqnr_db": math.inf}]  # fmt: skip
    score = dict(_ranking(blocks, layers, groups, stats))
    # blocks.0: 0.4 of its 0.5 is not explained by its linears alone; noise 1e-3 : 1e-1 : 1e-2
    noise = {"a": 1e-3, "b": 1e-1, "c": 1e-2}
    for x, own in (("a", 0.1), ("b", 0.0), ("c", 0.0)):
        assert score[x] == pytest.approx(own + 0.4 * noise[x] / sum(noise.values()))
    # blocks.1 unsearched: its alone shared 2 : 1 (d has weight noise too; e's is not finite)
    assert score["d"] == pytest.approx(0.2 * 2 / 3) and score["e"] == pytest.approx(0.2 / 3)
    assert [n for n, _ in _ranking(blocks, layers, groups, stats)] == ["b", "d", "a", "e", "c"]
    assert sum(score.values()) == pytest.approx(0.5 + 0.2)  # every block's damage, once


def test_top_blocks_hold_the_share_of_the_alone_damage():
    rows = [{"name": f"blocks.{i}", "alone_kl": v}
            for i, v in enumerate([0.05, 0.5, 0.3, 0.1, 0.0, -0.01])]  # fmt: skip
    assert _top_blocks(rows, 0.9) == ["blocks.1", "blocks.2", "blocks.3"]
    assert _top_blocks(rows, 0.5) == ["blocks.1"]
    assert _top_blocks([{"name": "blocks.0", "alone_kl": 0.0}], 0.9) == []


def test_every_subset_of_a_small_model_is_consistent():
    # a sanity check of the bookkeeping over all 2^4 damage tables of 0/1 interactions
    names = NAMES[:4]
    for bits in itertools.product([0.0, 1.0], repeat=4):
        def damage(s, bits=bits):
            return sum(b for n, b in zip(names, bits) if n in s) ** 1.5  # superadditive

        full = damage(set(names))

        def verify(keep, damage=damage):
            return {"kl": damage(set(names) - set(keep)), "ppl": 1.0}

        rec = _recommend(verify, full, [(n, 0.0) for n in names], 0.9)
        assert rec["reached"]
        assert rec["verified_kl"] == pytest.approx(damage(set(names) - set(rec["keep_16bit"])))
