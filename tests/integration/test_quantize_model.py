"""Quantisation of a tiny TRAINED outlierlab GPT (science §4): W16A16 ≈ FP, W8A8 close, and a
planted outlier neuron that leaves FP perplexity unchanged but hurts per-tensor W8A8."""

from __future__ import annotations

import copy
import json
import sysconfig
from pathlib import Path

import pytest
import torch

from outlierlab.data import BatchSampler, DataConfig, prepare, validation_windows
from outlierlab.model import GPT, GPTConfig
from outlierlab.quant import perplexity, quantize_and_evaluate, scheme
from outlierlab.quant.evaluate import calibration_batches

SEQ = 64
STEPS = 100


def write_corpus(folder: Path, n_files: int = 40, chars: int = 6000) -> Path:
    """A tiny real corpus: the first characters of some stdlib modules, one file each."""
    folder.mkdir(parents=True, exist_ok=True)
    lib = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(lib.glob("*.py"))[:n_files]:
        (folder / f"{f.stem}.txt").write_text(f.read_text(errors="ignore")[:chars])
    return folder


def train_tiny(tmp: Path) -> tuple[Path, GPT, object]:
    """Train a 2 × 64 ReLU pre-LN GPT for 100 AdamW steps on bytes; save it as a finished run
    folder (config.json, status.json, model.safetensors, model_config.json)."""
    data_cfg = DataConfig(
        source=str(write_corpus(tmp / "corpus")),
        tokenizer="bytes",
        val_fraction=0.2,
        cache_dir=str(tmp / "cache"),
    )
    data = prepare(data_cfg, progress=False)
    mcfg = GPTConfig(
        vocab_size=data.tokenizer.vocab_size,
        n_layer=2,
        d_model=64,
        n_head=4,
        seq_len=SEQ,
        activation="relu",
    )
    torch.manual_seed(0)
    model = GPT(mcfg)
    _fit(model, BatchSampler(data.train, SEQ, 8, seed=0))
    model.eval()
    run = tmp / "run"
    model.save(run)
    from outlierlab.config import RunConfig

    rc = RunConfig.from_dict({"model": mcfg.to_dict(), "data": data_cfg.to_dict()})
    (run / "config.json").write_text(json.dumps(rc.to_dict(), indent=2))
    (run / "status.json").write_text(json.dumps({"status": "finished", "step": STEPS}))
    return run, model, data


def _fit(model: GPT, sampler: BatchSampler) -> None:
    """STEPS of AdamW (lr 3e-3, betas 0.9/0.95, wd 0.1 via the model's groups, clip 1.0)."""
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=3e-3, betas=(0.9, 0.95), eps=1e-8)
    model.train()
    for _ in range(STEPS):
        x, y = sampler.next()
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(run folder, model, prepared data, validation x, y, calibration batches), built once."""
    tmp = tmp_path_factory.mktemp("quant_trained")
    run, model, data = train_tiny(tmp)
    x, y = validation_windows(data.val, SEQ, 32)
    calib = calibration_batches(data.train, SEQ, 8, 4)
    fp_ppl, fp_loss = perplexity(model, x, y, 16)
    return {
        "run": run,
        "model": model,
        "data": data,
        "x": x,
        "y": y,
        "calib": calib,
        "fp": {"ppl": fp_ppl, "loss": fp_loss, "seconds": 1.0},
    }


def _quant(t, model, cfg, reuse_fp=True):
    """quantize_and_evaluate on the fixture's windows; reuse_fp: skip re-measuring FP ppl."""
    fp = t["fp"] if reuse_fp else None
    return quantize_and_evaluate(model, cfg, t["calib"], t["x"], t["y"], 16, stats_windows=2, fp=fp)


@pytest.fixture(scope="session")
def w8a8(trained):
    """The trained model's w8a8-tensor result, shared by several tests."""
    return _quant(trained, trained["model"], scheme("w8a8-tensor"))


@pytest.fixture(scope="session")
def planted(trained):
    """(planted model, its w8a8-tensor result with FP measured afresh)."""
    model = plant_outlier_neuron(trained["model"])
    return model, _quant(trained, model, scheme("w8a8-tensor"), reuse_fp=False)


def plant_outlier_neuron(model: GPT, block: int = 0, neuron: int = 7, c: float = 256.0) -> GPT:
    """Function-preserving outlier: row j of mlp.fc scaled by c, column j of mlp.proj by 1/c.
    relu(c·z) = c·relu(z) for c > 0, so the logits are unchanged up to rounding."""
    planted = copy.deepcopy(model)
    mlp = planted.blocks[block].mlp
    with torch.no_grad():
        mlp.fc.weight[neuron] *= c
        mlp.proj.weight[:, neuron] /= c
    return planted


def test_model_trained(trained):
    assert trained["fp"]["ppl"] < 20.0  # far below the 257 of a uniform byte model


def test_w16a16_equals_fp_and_w8a8_is_close(trained, w8a8):
    model = trained["model"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fp = trained["fp"]["ppl"]
    r16 = _quant(trained, model, scheme("w8a8-tensor", w_bits=16, a_bits=16), reuse_fp=False)
    assert r16["fp_ppl"] == pytest.approx(fp, rel=1e-6)
    assert abs(r16["quant_ppl"] / fp - 1) < 1e-3
    r8 = w8a8
    assert abs(r8["quant_ppl"] / fp - 1) < 0.05
    rd = _quant(trained, model, scheme("w8a8-dynamic"))
    assert abs(rd["quant_ppl"] / fp - 1) < 0.05
    # the per-layer table covers every linear but the (tied) head, with finite SQNRs
    names = [row["name"] for row in r8["layers"]]
    assert names == [
        f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj")
    ]
    assert all(row["act_sqnr_db"] > 20 and row["weight_sqnr_db"] > 20 for row in r8["layers"])
    assert all(row["kurtosis"] >= 1.0 for row in r8["layers"])
    assert r8["kurtosis_mean"] >= 1.0
    # the caller's model is untouched
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_planted_outlier_neuron_hurts_per_tensor_w8a8(trained, w8a8, planted):
    fp = trained["fp"]["ppl"]
    base, hurt = w8a8, planted[1]
    assert hurt["fp_ppl"] == pytest.approx(fp, rel=1e-4)
    assert abs(base["quant_ppl"] / fp - 1) < 0.02
    assert hurt["quant_ppl"] / fp > 1.1
    row = {r["name"]: r for r in hurt["layers"]}["blocks.0.mlp.proj"]
    row0 = {r["name"]: r for r in base["layers"]}["blocks.0.mlp.proj"]
    assert row["kurtosis"] > 10 * row0["kurtosis"]  # the planted neuron dominates Eq. 1
    assert row["act_max"] > 50 * row0["act_max"]


def test_smoothquant_recovers_planted_outlier(trained, planted):
    fp = trained["fp"]["ppl"]
    plain = planted[1]
    smooth = _quant(trained, planted[0], scheme("w8a8-tensor", smooth_alpha=0.5))
    assert plain["quant_ppl"] / fp > 1.1
    assert smooth["quant_ppl"] / fp < 1.02
    assert smooth["config"]["smooth_alpha"] == 0.5


def test_residual_quantisation_and_percentile(trained, w8a8):
    r = _quant(trained, trained["model"], scheme("w8a8-tensor", quantize_residual=True))
    resid = [row for row in r["layers"] if row["kind"] == "residual"]
    assert [row["name"] for row in resid] == [
        "embed.resid_post",
        "blocks.0.resid_post",
        "blocks.1.resid_post",
    ]
    assert all(row["kurtosis"] >= 1.0 for row in resid)
    p = _quant(
        trained, trained["model"], scheme("w8a8-tensor", a_range="percentile", a_percentile=99.9)
    )
    m = w8a8
    # a percentile range is never wider than min-max over the same calibration data
    for rp, rm in zip(p["layers"], m["layers"]):
        assert rp["calib_max"] <= rm["calib_max"] + 1e-6
        assert rp["calib_min"] >= rm["calib_min"] - 1e-6


def test_calibration_batches_come_from_the_given_split_and_fit():
    import numpy as np

    from outlierlab.errors import DataError

    train = (np.arange(5000) % 100).astype(np.uint16)  # train ids < 100
    batches = calibration_batches(train, 16, 4, 3)
    assert len(batches) == 3 and batches[0].shape == (4, 16)
    assert all(int(b.max()) < 100 for b in batches)
    with pytest.raises(DataError, match="calibration batches"):
        calibration_batches(train, 16, 8, 40)


def _hashes(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "quant" not in p.relative_to(folder).parts
    }


SMALL = ["--calib-batches", "2", "--batch-size", "4", "--eval-windows", "8", "--stats-windows", "2"]


def test_cli_on_run_folder_saves_result_and_never_touches_the_model(trained, tmp_path, capsys):
    from outlierlab.cli import main

    run = trained["run"]
    before = _hashes(run)
    out = tmp_path / "q.json"
    assert main(["quantize", str(run), *SMALL, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "FP perplexity" in printed and "blocks.1.mlp.proj" in printed
    result = json.loads(out.read_text())
    assert {"fp_ppl", "quant_ppl", "scheme", "config", "layers"} <= set(result)
    assert result["scheme"] == "w8a8-tensor" and result["eval_windows"] == 8
    saved = json.loads((run / "quant" / "w8a8-tensor.json").read_text())
    assert saved["quant_ppl"] == result["quant_ppl"]
    assert _hashes(run) == before


def test_cli_w8a8_paper_on_a_run_prints_every_site(trained, tmp_path, capsys):
    """Bondarenko et al.'s sites (issue 23) end to end: qkv and mlp.fc are weight-only rows
    (their outputs are quantised by the q/k/v and activation sites), the rest carry SQNR."""
    from outlierlab.cli import main

    out = tmp_path / "paper.json"
    assert main(["quantize", str(trained["run"]), "--scheme", "w8a8-paper", *SMALL,
                 "--no-save", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "blocks.0.attn.scores" in printed and "blocks.1.attn_sum" in printed
    result = json.loads(out.read_text())
    kinds = {r["name"]: r["kind"] for r in result["layers"]}
    assert kinds["blocks.0.attn.qkv"] == "linear-weight"
    assert kinds["blocks.0.attn.proj.output"] == "linear-output"
    assert result["config"]["paper_sites"] and result["quant_ppl"] > 0


def test_cli_calibration_larger_than_data_is_one_line_exit_2(trained, capsys):
    from outlierlab.cli import main

    argv = ["quantize", str(trained["run"]), "--calib-batches", "100000", "--no-save"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "calibration batches" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--w-bits", "1"], "w_bits must be in 2..16"),
        (["--a-bits", "17"], "a_bits must be in 2..16"),
        (["--scheme", "int8"], "allowed: w8a8-tensor, w8a8-dynamic, w4a8, w8a4"),
        (["--smooth", "2"], "smooth alpha"),
        (["--calib-batches", "0"], "--calib-batches: '0' is not allowed; allowed: an integer ≥ 1"),
    ],
)
def test_cli_bad_options_exit_2_before_loading(tmp_path, capsys, argv, needle):
    from outlierlab.cli import main

    try:
        rc = main(["quantize", str(tmp_path / "missing"), *argv])
    except SystemExit as exc:  # argparse's usage error for option values
        rc = exc.code
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and needle in err


def test_cli_missing_folder_exit_2(tmp_path, capsys):
    from outlierlab.cli import main

    assert main(["quantize", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err


def test_model_without_linear_layers_is_refused():
    from outlierlab.errors import ModelLoadError
    from outlierlab.quant import wrap

    with pytest.raises(ModelLoadError, match="no linear layers"):
        wrap(torch.nn.Sequential(torch.nn.Embedding(10, 4)), scheme("w8a8-tensor"))
    # a model whose only linear is the head: nothing to quantise unless the head is asked for
    head_only = torch.nn.ModuleDict(
        {"emb": torch.nn.Embedding(10, 4), "lm_head": torch.nn.Linear(4, 10)}
    )
    with pytest.raises(ModelLoadError):
        wrap(head_only, scheme("w8a8-tensor"))
    assert wrap(head_only, scheme("w8a8-tensor", quantize_head=True)) is not head_only


def test_cli_predictors_on_a_run(trained, tmp_path, capsys):
    """``--predictors``: the predictor table rides with the result (2 blocks: every ρ
    undefined, the per-block values and the recommendation there); a rotated scheme refused."""
    from outlierlab.cli import main

    out = tmp_path / "p.json"
    assert main(["quantize", str(trained["run"]), *SMALL, "--no-save", "--quiet",
                 "--predictors", "--json", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "which measurement predicts" in printed and "16-bit set" in printed
    pred = json.loads(out.read_text())["predictors"]
    assert [b["block"] for b in pred["blocks"]] == ["blocks.0", "blocks.1"]
    assert all(b["alone_kl"] >= 0 and b["kurtosis"] >= 1 for b in pred["blocks"])
    assert all(r["rho_alone"] is None and r["n"] == 2 for r in pred["rows"])
    assert pred["scheme"] == "w8a8-tensor" and pred["keep_16bit"]
    rc = main(["quantize", str(trained["run"]), "--scheme", "w4a4-quarot", "--predictors",
               "--no-save"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "--predictors" in err and "w4a4-quarot" in err and "w8a8-tensor" in err
