"""The across-runs predictor summary (issue 22): seed means per configuration, the sign test,
the median, and the signs of SQNR predictors, against hand computations."""

from __future__ import annotations

import math

import pytest

from outlierlab.experiments.mechanism import sign_test_p
from outlierlab.experiments.predictors import RunPredictors, summary, table


def runs(scheme="w8a8-tensor"):
    # three configurations, two seeds each: Kurt's ρ per run, the activation SQNR's, the output
    # error's (nan: a run where it was undefined)
    kurt = {"A": [0.8, 0.4], "B": [-0.2, 0.4], "C": [-1.0, -0.6]}
    sqnr = {"A": [-0.8, -1.0], "B": [-0.4, 0.2], "C": [0.6, 0.2]}
    out = []
    for c in kurt:
        for s in range(2):
            rho = {"kurtosis": kurt[c][s], "act_sqnr_db": sqnr[c][s],
                   "output_error": math.nan if (c, s) == ("C", 1) else 1.0}
            out.append(RunPredictors(f"{c}-seed{s}", c, "pre-ln", scheme, 4, rho))
    return out


def test_summary_by_hand():
    rows = {r["key"]: r for r in summary(runs())}
    assert set(rows) == {"kurtosis", "act_sqnr_db", "output_error"}  # others: no run has them
    k = rows["kurtosis"]
    # seed means A 0.6, B 0.1, C −0.8: two of three point up; P(X ≥ 2 | n=3) = 4/8
    assert (k["runs"], k["configurations"], k["configurations_right"]) == (6, 3, 2)
    assert k["p"] == pytest.approx(0.5) == sign_test_p(2, 3)
    assert k["median_rho"] == pytest.approx(0.1)  # (−0.2 + 0.4) / 2 over the six runs
    s = rows["act_sqnr_db"]  # an SQNR predicts with ρ < 0: means −0.9, −0.1, 0.4
    assert s["sign"] == -1 and s["configurations_right"] == 2
    o = rows["output_error"]  # C's seed 1 left out, C still counted by its other seed
    assert (o["runs"], o["configurations"], o["configurations_right"]) == (5, 3, 3)
    assert o["p"] == pytest.approx(1 / 8)


def test_summary_keeps_schemes_apart_and_table_rows():
    rows = summary(runs("w8a8-tensor") + runs("w6a6-tensor")[:2])
    assert [r["scheme"] for r in rows].count("w6a6-tensor") == 3
    w6 = next(r for r in rows if r["scheme"] == "w6a6-tensor" and r["key"] == "kurtosis")
    assert (w6["runs"], w6["configurations"], w6["configurations_right"]) == (2, 1, 1)
    header, body = table(rows)
    assert len(body) == len(rows) and len(header) == len(body[0])
    first = body[0]
    assert first[0] == "w6a6-tensor" and first[3] == "+0.60" and first[4] == "1 of 1"
    assert summary([]) == []
