"""MeasureEvery: which steps are measured, all micro-batches of a step, subsamples seeded by the
step (not by how many steps were measured before), hooks removed."""

from __future__ import annotations

import pytest
import torch

from outlierlab.errors import ConfigError
from outlierlab.measuring import MeasureEvery
from outlierlab.model import GPT, GPTConfig


def gpt():
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, d_model=32, n_head=2, seq_len=32, vocab_size=64))


def batch(seed: int, n: int = 12):
    return torch.randint(0, 64, (n, 32), generator=torch.Generator().manual_seed(seed))


def test_due_steps_and_bad_every():
    assert [s for s in range(1, 13) if MeasureEvery(4).due(s)] == [4, 8, 12]
    assert not any(MeasureEvery(0).due(s) for s in range(1, 10))
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="every="):
            MeasureEvery(bad)


def test_measures_every_micro_batch_of_a_due_step_only():
    model, m = gpt(), MeasureEvery(2)
    m.open(model)
    seen = {}
    with torch.no_grad():
        for step in (1, 2, 3):
            m.begin_step(step)
            for a in range(3):  # three micro-batches
                model(batch(10 * step + a))
            seen[step] = m.end_step()
    m.close()
    assert seen[1] is None and seen[3] is None
    assert seen[2].step == 2
    assert all(r["tokens"] == 3 * 12 * 32 for r in seen[2].results.values())
    row = seen[2].row()
    assert set(row) == {"kurtosis", "mmr", "cos_sim", "kurtosis_mean", "kurtosis_max",
                        "kurtosis_authors", "corr_authors", "attn_entropy", "attn_entropy_min"}
    points = list(model.residual_points())
    assert all(list(row[k]) == points for k in ("kurtosis_authors", "corr_authors"))
    assert list(row["attn_entropy"]) == [f"blocks.{i}.attn" for i in range(len(model.blocks))]
    assert row["attn_entropy_min"] == min(row["attn_entropy"].values())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in model.modules())
    assert all(mod.probs_sink is None for mod in model.attention_points().values())


def test_subsample_depends_on_the_step_not_on_history():
    # 12 × 32 = 384 tokens > mmr_max_tokens=256: Eq. 2 sees a seeded subsample
    def mmr_at_6(history: list[int]) -> dict:
        model, m = gpt(), MeasureEvery(1)
        m.open(model)
        with torch.no_grad():
            for step in [*history, 6]:
                m.begin_step(step)
                model(batch(step))
                out = m.end_step()
        m.close()
        return {k: v["mmr"] for k, v in out.results.items()}

    fresh, resumed = mmr_at_6([]), mmr_at_6([1, 2, 3, 4, 5])
    assert fresh == resumed
    other = MeasureEvery(1, seed=1)
    model = gpt()
    other.open(model)
    other.begin_step(6)
    with torch.no_grad():
        model(batch(6))
    assert {k: v["mmr"] for k, v in other.end_step().results.items()} != fresh


def test_imports_no_framework():
    import subprocess
    import sys

    code = ("import sys, outlierlab.measuring, outlierlab.integrations.core; "
            "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') "
            "if m in sys.modules))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
