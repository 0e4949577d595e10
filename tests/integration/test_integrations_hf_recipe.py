"""The plain-loop recipe in docs/integrations.md (and the README) runs as written."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from transformers import GPT2Config, GPT2LMHeadModel

pytestmark = pytest.mark.hf

DOC = Path(__file__).resolve().parents[2] / "docs" / "integrations.md"


README = DOC.parents[1] / "README.md"


def recipe(path: Path = DOC) -> str:
    text = path.read_text()
    m = re.search(r"<!-- recipe: plain loop.*?-->\s*```python\n(.*?)```", text, re.S)
    assert m, f"recipe block missing from {path.name}"
    return m.group(1)


def test_readme_shows_the_tested_recipe():
    assert recipe(README) == recipe(DOC)


def kurt64(x: torch.Tensor) -> float:
    """Eq. 1 in float64 numpy."""
    s2 = (x.reshape(-1, x.shape[-1]).double().numpy() ** 2).mean(0)
    return float((s2**2).mean() / s2.mean() ** 2)


def test_plain_loop_recipe_measures_exactly_step_100(capsys):
    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 64, (100, 2, 16), generator=g)
    loader = [{"input_ids": x, "labels": x} for x in ids]
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # weights fixed: recompute by hand
    ns = {"model": model, "loader": loader, "opt": opt}
    exec(compile(recipe(), str(DOC), "exec"), ns)

    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("100 {'kurtosis_mean': "), lines
    printed = ast.literal_eval(lines[0].split(" ", 1)[1])
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())

    blocks = {}
    hooks = [
        b.register_forward_hook(
            lambda m, a, o, i=i: blocks.__setitem__(i, o[0] if isinstance(o, tuple) else o)
        )
        for i, b in enumerate(model.transformer.h)
    ]
    with torch.no_grad():
        hs = model(ids[99], output_hidden_states=True).hidden_states  # step 100's batch
    for h in hooks:
        h.remove()
    kurts = [kurt64(hs[0]), kurt64(blocks[0]), kurt64(blocks[1])]
    assert printed["kurtosis_mean"] == pytest.approx(np.mean(kurts), rel=1e-5)
    assert printed["kurtosis_max"] == pytest.approx(max(kurts), rel=1e-5)
