"""Per-layer figures over training: the signal-propagation figure (cos-sim beside the authors'
batch_corr_mean), MMR and attention entropy, read from metrics.jsonl fields."""

from __future__ import annotations

import numpy as np

from outlierlab.experiments import figures as F
from outlierlab.experiments.results import load_run
from outlierlab.run_folder import RunFolder
from run_fixtures import write_run

PNG = b"\x89PNG\r\n\x1a\n"


def _with_authors_fields(path, entropy: bool):
    """Add corr_authors / attn_entropy per layer to every monitor row of a fixture run."""
    run = RunFolder(path)
    rows = run.metrics
    run.metrics_file.unlink()
    writer = run.metrics_writer()
    for i, rec in enumerate(rows):
        if isinstance(rec.get("kurtosis"), dict):
            rec["corr_authors"] = {p: 0.1 * i for p in rec["kurtosis"]}
            if entropy:
                rec["attn_entropy"] = {f"blocks.{j}.attn": 3.0 - 0.5 * i - j for j in range(4)}
        writer.write(rec)
    writer.close()


def test_layer_series_read_and_drawn(tmp_path):
    a, b = write_run(tmp_path / "op-seed0", arch="op"), write_run(tmp_path / "pre-ln-seed0")
    _with_authors_fields(a, entropy=True)
    _with_authors_fields(b, entropy=False)
    runs = [load_run(a), load_run(b)]
    r = runs[0]
    assert set(r.layer_series["corr_authors"]) == set(r.kurtosis)
    assert list(r.layer_series["attn_entropy"]) == [f"blocks.{j}.attn" for j in range(4)]
    np.testing.assert_allclose(r.layer_series["attn_entropy"]["blocks.1.attn"],
                               [2.0 - 0.5 * i for i in range(r.kurt_steps.size)])
    assert runs[1].layer_series["attn_entropy"] == {}
    for fn in (F.signal_propagation_vs_step, F.mmr_vs_step, F.attn_entropy_vs_step):
        out = fn(runs, tmp_path / f"{fn.keywords['metrics'][0][0]}.png")
        assert out is not None and out.read_bytes()[:8] == PNG
    # entropy logged by no run: no figure
    assert F.attn_entropy_vs_step(runs[1:], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
