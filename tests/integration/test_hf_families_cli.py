"""Every causal-LM family transformers ships (``hf_families``: a tiny random model of each, with a
tokenizer the test writes) through the CLI as a user runs it: ``measure --profile``,
``quantize`` with ``w8a8-dynamic``, and ``price`` (whose rows include ``w8a8-tensor``); the
residual stream is found by structure discovery, not a table of families. The HF Trainer
callback runs on a few families of different shapes. Skipped families and why:
``hf_families.SKIPS``."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_families import FAMILIES, SKIPS, save_tiny, tiny_model  # noqa: E402
from outlierlab.cli import main  # noqa: E402

pytestmark = [pytest.mark.hf, pytest.mark.slow]

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog; {i * 7919 % 1000} apples.\n"
    f"    code = [{i}, {i + 1}]  # ünïcödé"
    for i in range(60)
)
# Families whose block count is not 2 with hf_families' configs (what discovery finds, and why)
BLOCKS = {
    "hrm_text": 2,  # two stacks of 2 (H and L modules): the first found (its H module)
    "nemotron_h": 4,  # one block per mixer kind (mamba, MoE, attention, MLP)
}
# Families without softmax attention probabilities per block: state-space and recurrent mixers
# (mamba, rwkv, xlstm), LSH attention (reformer), no block modules (xlm), several stacks (blt,
# hrm_text), two-stream relative attention returning a pair (xlnet)
ATTENTION_OPTIONAL = {"mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "reformer", "xlm",
                      "blt", "hrm_text", "xlnet"}  # fmt: skip
QUANT = ["--eval-windows", "2", "--stats-windows", "1", "--calib-batches", "1",
         "--batch-size", "2"]  # fmt: skip


def run_cli(argv: list[str], capsys) -> str:
    capsys.readouterr()
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured.out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.mark.parametrize("family", [
    pytest.param(f, marks=pytest.mark.skip(reason=SKIPS[f])) if f in SKIPS else f
    for f in FAMILIES
])  # fmt: skip
def test_family_through_measure_quantize_price(family, tmp_path, text_file, capsys):
    folder = save_tiny(family, tmp_path / family)
    data = ["--data", str(text_file), "--seq-len", "16"]

    out = run_cli(["measure", str(folder), *data, "--max-tokens", "64", "--profile",
                   "--json", str(tmp_path / "m.json")], capsys)  # fmt: skip
    found = re.search(r"structure: (\d+) blocks at (\S+) \((\w+)\)", out)
    assert found and found.group(3) in ("discovered", "override"), out
    blocks = int(found.group(1))
    assert blocks == BLOCKS.get(family, 2), out
    rep = json.loads((tmp_path / "m.json").read_text())
    names = ["embed.resid_post"] + [f"blocks.{i}.resid_post" for i in range(blocks)]
    assert [p["name"] for p in rep["points"]] == names
    assert all(math.isfinite(p["kurtosis"]) and p["kurtosis"] >= 1 - 1e-9 for p in rep["points"])
    prof = rep["profile"]
    assert [p["name"] for p in prof["points"]] == names
    assert all(math.isfinite(p["max_abs"]) for p in prof["points"])
    if family not in ATTENTION_OPTIONAL:  # attention probabilities found and hooked
        assert rep.get("attn_entropy"), f"{family}: no attention entropy"
        assert prof["attention"] and all(0 <= a["mass_token0"] <= 1 + 1e-6
                                         for a in prof["attention"])  # fmt: skip

    # quantize with the per-token scheme; the static per-tensor one runs as price's first row
    # (the same quantize_model path), so each family loads three times, not four
    q = tmp_path / "w8a8-dynamic.json"
    run_cli(["quantize", str(folder), *data, *QUANT, "--scheme", "w8a8-dynamic", "--quiet",
             "--json", str(q)], capsys)  # fmt: skip
    res = json.loads(q.read_text())
    assert math.isfinite(res["quant_ppl"]) and res["fp_ppl"] > 1
    assert any(r["kind"] in ("linear", "experts") for r in res["layers"])

    rows = ["w8a8-tensor", "fp8-dynamic", "w4a16-rtn"]  # the page's pipeline, cheap rows
    run_cli(["price", str(folder), *data, *QUANT, "--quiet", "--no-figures", "--schemes", *rows,
             "--out", str(tmp_path / "price")], capsys)  # fmt: skip
    page = json.loads((tmp_path / "price" / "price.json").read_text())
    assert [s["label"] for s in page["schemes"]] == rows and math.isfinite(page["fp_ppl"])
    assert all(math.isfinite(s["quant_ppl"]) for s in page["schemes"] if "error" not in s)


@pytest.mark.parametrize("family", ["qwen3_moe", "falcon", "gemma3_text", "bamba", "phi"])
def test_hf_trainer_callback_on_other_families(family, tmp_path):
    """The Trainer callback measures every block of MoE, parallel-block, sliding-window and
    hybrid state-space models (it was refused outside a family table before)."""
    pytest.importorskip("accelerate")
    from transformers import Trainer, TrainingArguments

    from outlierlab.integrations.hf import OutlierCallback

    model = tiny_model(family).train()
    ids = torch.randint(3, 200, (8, 16), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": x, "labels": x} for x in ids]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to=[],
                             per_device_train_batch_size=4, max_steps=2, learning_rate=1e-3,
                             logging_steps=1, save_strategy="no", disable_tqdm=True, seed=0)
    cb = OutlierCallback(every=1)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    cb.attach(trainer)
    trainer.train()
    logged = [e for e in trainer.state.log_history if "outliers/kurtosis_mean" in e]
    assert [e["step"] for e in logged] == [1, 2]
    blocks = BLOCKS.get(family, 2)
    for i in range(blocks):
        assert math.isfinite(logged[-1][f"outliers/kurtosis/blocks.{i}.resid_post"])
