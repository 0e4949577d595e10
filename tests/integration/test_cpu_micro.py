"""The `cpu` preset in miniature: every seed-0 point trained for a few steps at a tiny size
(the preset's own overrides, then smaller ones), then the claims and the report. Checks the
whole path the full sweep takes: the ablations train (OP without QK-norm may diverge: a
result, not a failure), step 0 and the held-out Kurt are logged, each claim's pairs differ in
the field under test only, and one seed reads as indicative."""

from __future__ import annotations

import pytest
from test_train import make_corpus

from outlierlab import config as C
from outlierlab.experiments import claims as CL
from outlierlab.experiments.grid import load_grid
from outlierlab.experiments.report import write_report
from outlierlab.experiments.results import load_runs
from outlierlab.train import train

SMALL = ["model.n_layer=2", "model.d_model=16", "model.n_head=2", "model.seq_len=32",
         "train.steps=4", "train.batch_size=4", "train.log_every=2", "train.eval_every=4",
         "train.eval_windows=4", "train.ckpt_every=0", "log.kurtosis_every=2"]


@pytest.mark.slow
def test_cpu_preset_one_seed_micro(tmp_path, cache_dir):
    corpus = make_corpus(tmp_path / "corpus", files=10)
    grid = load_grid("cpu")
    points = [p for p in grid.points if p.overrides.get("train.seed") == 0]
    assert len(points) == 25
    for p in points:
        cfg = C.load(grid.preset, None, [*p.args(), *SMALL, f"data.source={corpus}",
                                         f"out={tmp_path / 'runs' / p.name}"])
        res = train(cfg, progress=False)
        assert res.status in ("finished", "diverged"), (p.name, res.message)
    runs, unreadable = load_runs([tmp_path / "runs"])
    assert unreadable == [] and len(runs) == 25
    for r in runs:
        if r.finished:
            assert r.held_out and 1.0 <= r.init_kurt_mean < 2.0 and r.kurt_steps[0] == 0
    res = {c.key: c for c in CL.evaluate_claims(runs)}
    for key in ("op_vs_prenorm", "lower_lr", "larger_eps", "soap_vs_adamw", "op_final_norm",
                "qk_norm", "small_beta"):
        assert not any(d.startswith("not tested: runs differ") for d in res[key].details)
        assert res[key].verdict != CL.HELD  # one seed never holds
    rep = write_report(runs, tmp_path / "report")
    md = rep.markdown.read_text()
    assert "indicative only" in md and "## Pairs compared" in md
    assert "model.qk_norm: True → False" in md or "attention entropy not logged" in md
