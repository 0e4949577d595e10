"""The per-tensor test of the quantisation claim (issue 23): the layer report of `w8a8-paper`
carries every site's Kurt, max/median and SQNR; per run ρ(Kurt, SQNR), across configurations a
sign test; the report shows the table and the figure."""

from __future__ import annotations

import math

import pytest
import torch

from outlierlab.experiments import mechanism as M
from outlierlab.experiments.results import load_run
from outlierlab.jsonable import write_json
from outlierlab.model.config import GPTConfig
from outlierlab.model.gpt import GPT
from outlierlab.quant import quantize_and_evaluate, scheme
from outlierlab.run_folder import RunFolder
from run_fixtures import write_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_w8a8_paper_layer_report_has_kurt_max_median_and_sqnr_per_site():
    torch.manual_seed(0)
    model = GPT(GPTConfig.preset("pre-ln", n_layer=2, d_model=32, n_head=2, seq_len=16)).eval()
    with torch.no_grad():  # trained-looking gains (1.0 is exactly on their grid)
        model.blocks[0].attn_norm.weight.add_(0.1 * torch.randn(32))
    g = torch.Generator().manual_seed(1)
    calib = [torch.randint(0, 260, (2, 16), generator=g) for _ in range(2)]
    x = torch.randint(0, 260, (4, 17), generator=g)
    res = quantize_and_evaluate(model, scheme("w8a8-paper"), calib, x[:, :-1], x[:, 1:],
                                batch_size=4, stats_windows=4)
    pts = M.site_points(res)
    # 28 sites in a 2-block Pre-LN GPT, less QKᵀ and softmax (no feature dim) in each block
    assert len(pts) == 24 and len(res["layers"]) == 28 + 4  # + qkv, mlp.fc: weight-only rows
    assert all(p["kurtosis"] >= 1 and math.isfinite(p["sqnr"]) for p in pts)
    # max/median of a ReLU output is undefined (median |x| = 0 in most tokens): left out
    assert all(p["mmr"] >= 1 or (p["kind"] == "mlp-act" and math.isnan(p["mmr"])) for p in pts)
    kinds = {p["kind"] for p in pts}
    assert kinds == {"residual", "norm", "attention", "mlp-act", "linear-output"}
    norm = next(r for r in res["layers"] if r["name"] == "blocks.0.attn_norm")
    assert norm["weight_sqnr_db"] > 20  # its gain is quantised with it
    resid = next(r for r in res["layers"] if r["name"] == "blocks.1.resid_post")
    assert resid["kurtosis"] == pytest.approx(res["residual_kurtosis"]["blocks.1.resid_post"])


def _layers(kurts, sqnrs):
    return [{"name": f"t{i}", "kind": "residual", "kurtosis": k, "mmr": 2 * k,
             "act_sqnr_db": s} for i, (k, s) in enumerate(zip(kurts, sqnrs, strict=True))]


def _runs(tmp_path):
    """Three configurations: two with ρ = −1 over their tensors, one with ρ = +1; one
    configuration has two seeds (ρ −1 and +0.6: seed mean −0.2)."""
    specs = {"pre-0": ("pre-ln", 0, [1, 2, 3, 4, 5], [40, 35, 30, 25, 20]),
             "pre-1": ("pre-ln", 1, [1, 2, 3, 4, 5], [20, 35, 30, 25, 40]),
             "op-0": ("op", 0, [1, 1.5, 2, 2.5], [30, 29, 28, 27]),
             "post-0": ("post-ln", 0, [1, 2, 3, 4], [20, 21, 22, 23])}
    runs = []
    for name, (arch, seed, k, s) in specs.items():
        path = write_run(tmp_path / name, arch=arch, seed=seed, quant={"w8a8-paper": (5, 6)})
        write_json(RunFolder(path).quant_file("w8a8-paper"),
                   {"scheme": "w8a8-paper", "fp_ppl": 5.0, "quant_ppl": 6.0,
                    "config": scheme("w8a8-paper").to_dict(), "layers": _layers(k, s)})
        runs.append(load_run(path))
    return runs


def test_per_run_rho_and_sign_test_over_configurations(tmp_path):
    tests = {t.run: t for t in M.site_tests(_runs(tmp_path))}
    assert tests["pre-0"].rho_kurt == pytest.approx(-1.0)
    assert tests["pre-0"].rho_mmr == pytest.approx(-1.0)
    assert tests["post-0"].rho_kurt == pytest.approx(1.0)
    assert tests["pre-1"].rho_kurt == pytest.approx(0.6)  # ranks 1, 4, 3, 2, 5: Σd² = 8
    [s] = M.summary(list(tests.values()))
    assert (s["runs"], s["runs_negative"]) == (4, 2)
    # configurations: pre-ln (mean −0.2), op (−1), post-ln (+1): 2 of 3 negative
    assert (s["configurations"], s["configurations_negative"]) == (3, 2)
    assert s["p"] == pytest.approx(M.sign_test_p(2, 3)) == pytest.approx(4 / 8)
    assert M.sign_test_p(3, 3) == pytest.approx(1 / 8) and M.sign_test_p(0, 0) == 1.0
    assert "2 of 3 configurations" in M.summary_lines([s])[0]


def test_figure_draws_every_tensor_and_each_runs_rho(tmp_path):
    tests = M.site_tests(_runs(tmp_path / "runs"))
    assert M.figure(tests, tmp_path / "f.png").read_bytes()[:8] == PNG
    assert M.figure([], tmp_path / "g.png") is None
    _, rows = M.table(tests)
    op = next(r for r in rows if r[0] == "op-0")
    assert op == ["op-0", "w8a8-paper", "4", "-1.00", "-1.00", "t3 27.0 dB (2.5)"]
