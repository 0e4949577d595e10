"""`outlierlab measure` end to end on tiny local model folders (HF and outlierlab); no downloads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from outlierlab import metrics as M
from outlierlab.cli import main
from tolerances import F32_SUMS, F32_SUMS_ABS

transformers = pytest.importorskip("transformers")

TEXT = (
    "the quick brown fox jumps over the lazy dog . a small model reads some text and the "
    "monitor measures every layer of it . outliers grow when the learning rate is large . "
) * 40
V = 128


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        [TEXT], trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>", "<eos>"])
    )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>"
    )
    assert len(fast) <= V
    return fast


def hf_folder(tmp_path, family="gpt2", name="model"):
    T = transformers
    torch.manual_seed(0)
    if family == "gpt2":
        cfg = T.GPT2Config(
            n_layer=2,
            n_embd=32,
            n_head=2,
            vocab_size=V,
            n_positions=64,
            bos_token_id=1,
            eos_token_id=1,
        )
    elif family == "llama":
        cfg = T.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=32,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=64,
            vocab_size=V,
            max_position_embeddings=64,
        )
    else:  # an architecture outlierlab has no point map for
        cfg = T.BloomConfig(n_layer=2, hidden_size=32, n_head=2, vocab_size=V)
    model = T.AutoModelForCausalLM.from_config(cfg)
    folder = tmp_path / name
    model.save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    return hf_folder(tmp_path_factory.mktemp("hf"))


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


def test_measure_hf_gpt2_table_and_json(tmp_path, gpt2_dir, text_file, capsys):
    folder = gpt2_dir
    out = tmp_path / "out.json"
    args = [
        str(folder),
        "--data",
        str(text_file),
        "--seq-len",
        "16",
        "--max-tokens",
        "100",
        "--batch-size",
        "2",
        "--json",
        str(out),
    ]
    assert main(["measure", *args]) == 0
    printed = capsys.readouterr().out
    assert "blocks.1.resid_post" in printed and "Kurt" in printed
    data = json.loads(out.read_text())
    assert set(data) == {"model", "tokens", "points", "attn_entropy", "attn_entropy_min"}
    # HF attention probabilities (eager, hooked): a causal row of length t has entropy ≤ log t
    ent = data["attn_entropy"]
    assert list(ent) == ["blocks.0.attn", "blocks.1.attn"]
    assert all(0 < v <= math.log(16) for v in ent.values())
    assert data["model"] == str(folder) and data["tokens"] == 6 * 16  # 100 // 16 windows
    assert [p["name"] for p in data["points"]] == [
        "embed.resid_post",
        "blocks.0.resid_post",
        "blocks.1.resid_post",
    ]
    for p in data["points"]:
        assert set(p) == {"name", "kurtosis", "mmr", "cos_sim", "kurtosis_authors",
                          "corr_authors", "outlier_neurons"}
        assert p["kurtosis"] >= 1 and p["mmr"] >= 1
    # independent check: the same windows through the model, hidden_states[0] by hand
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = torch.tensor(tok.encode(TEXT, add_special_tokens=False)[:96]).view(6, 16)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        h0 = model(ids, output_hidden_states=True).hidden_states[0]
    assert data["points"][0]["kurtosis"] == pytest.approx(M.kurtosis(h0), rel=F32_SUMS)
    assert data["points"][0]["mmr"] == pytest.approx(M.max_median_ratio(h0), rel=1e-9)
    assert data["points"][0]["kurtosis_authors"] == pytest.approx(M.kurtosis_authors(h0),
                                                                rel=F32_SUMS)
    assert data["points"][0]["corr_authors"] == pytest.approx(M.corr_authors(h0), rel=F32_SUMS,
                                                            abs=F32_SUMS_ABS)


def test_measure_folder_of_text_and_points_glob(tmp_path, capsys):
    folder = hf_folder(tmp_path, "llama")
    data_dir = tmp_path / "texts"
    (data_dir / "sub").mkdir(parents=True)
    (data_dir / "a.txt").write_text(TEXT[:800])
    (data_dir / "sub" / "b.md").write_text(TEXT[800:1600])
    (data_dir / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    out = tmp_path / "o.json"
    assert (
        main(
            [
                "measure",
                str(folder),
                "--data",
                str(data_dir),
                "--seq-len",
                "8",
                "--max-tokens",
                "64",
                "--points",
                "model.layers.*.mlp",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert [p["name"] for p in data["points"]] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert data["tokens"] == 64


def test_measure_outlierlab_model_and_run_folder(tmp_path, text_file, cache_dir, capsys):
    from outlierlab.model import GPT, GPTConfig

    cfg = GPTConfig.preset(
        "pre-ln", vocab_size=257, n_layer=2, d_model=32, n_head=2, d_mlp=64, seq_len=32
    )
    run = tmp_path / "run"
    GPT(cfg).save(run)
    (run / "config.json").write_text(
        json.dumps(
            {
                "model": cfg.to_dict(),
                "data": {"source": str(text_file), "tokenizer": "bytes", "val_fraction": 0.5},
            }
        )
    )
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "measure",
                str(run),
                "--data",
                str(text_file),
                "--seq-len",
                "32",
                "--max-tokens",
                "256",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads(out.read_text())
    assert data["tokens"] == 256 and len(data["points"]) == 3
    assert list(data["attn_entropy"]) == ["blocks.0.attn", "blocks.1.attn"]
    assert data["attn_entropy_min"] == min(data["attn_entropy"].values())
    assert 0 < data["attn_entropy_min"] <= sum(math.log(t + 1) for t in range(32)) / 32 + 1e-6
    capsys.readouterr()
    # no --data: the run's own validation windows; --authors adds two columns
    argv = ["measure", str(run), "--seq-len", "16", "--max-tokens", "64", "--authors"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "blocks.1.resid_post" in printed and "corr (a)" in printed
    assert "attention entropy" in printed and "blocks.1 " in printed
    # --save: measure.json in the run folder, which the leaderboard reads (sinks, max/median)
    assert main(["measure", str(run), "--seq-len", "16", "--max-tokens", "64", "--save"]) == 0
    saved = json.loads((run / "measure.json").read_text())
    assert [a["layer"] for a in saved["profile"]["attention"]] == ["blocks.0.attn",
                                                                    "blocks.1.attn"]
    from outlierlab.experiments.results import load_run

    rec = load_run(run)
    masses = [a["mass_token0"] for a in saved["profile"]["attention"]]
    assert rec.first_token_mass == pytest.approx(sum(masses) / 2) and 0 < rec.first_token_mass < 1
    assert rec.max_median == max(p["max_median_ratio"] for p in saved["profile"]["points"])


def one_line_error(capsys, argv, *needles):
    capsys.readouterr()  # drop what building the folders printed
    try:
        rc = main(["measure", *argv])
    except SystemExit as exc:  # argparse's usage error for option values
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("outlierlab measure: error:"), err
    for n in needles:
        assert n in err, err


def test_bad_input_one_line_exit_2(tmp_path, gpt2_dir, text_file, capsys):
    one_line_error(capsys, [str(tmp_path / "nope"), "--data", str(text_file)], "does not exist")
    empty_model = tmp_path / "noweights"
    empty_model.mkdir()
    (empty_model / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    one_line_error(capsys, [str(empty_model), "--data", str(text_file)], "no weights")
    folder = gpt2_dir
    one_line_error(capsys, [str(folder), "--data", str(text_file), "--seq-len", "0"], "--seq-len")
    one_line_error(capsys, [str(folder), "--data", str(text_file), "--seq-len", "999"], "context")
    blank = tmp_path / "blank.txt"
    blank.write_text("  \n\n")
    one_line_error(capsys, [str(folder), "--data", str(blank)], "holds no text")
    one_line_error(capsys, [str(folder), "--data", str(tmp_path / "none.txt")], "does not exist")
    one_line_error(
        capsys, [str(folder), "--data", str(text_file), "--points", "zzz*"], "match nothing"
    )
    one_line_error(capsys, [str(folder), "--data", str(text_file), "--save"], "needs a run folder")


def test_hf_folder_without_data_measures_quantizes_validation_windows(gpt2_dir, tmp_path):
    """Without --data, measure measures the validation windows quantize and price evaluate on
    (model_data: the stdlib corpus's validation split, the model's tokenizer): the same ids."""
    from outlierlab import model_data
    from outlierlab.loading import load_model

    out = tmp_path / "m.json"
    assert main(["measure", str(gpt2_dir), "--max-tokens", "256", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["tokens"] == 256
    loaded = load_model(gpt2_dir)
    seq = model_data.seq_len_for(loaded, None)
    assert seq == 64  # the default 256, capped at this model's context
    data = model_data.load_data(loaded, None, seq, 16, 2 * 4 * seq + 1)
    x16, _ = data.windows(16)
    x4, _ = model_data.load_data(loaded, None, seq, 4).windows(4)
    assert torch.equal(x4, x16[:4])  # fewer windows: a prefix of the same windows
    assert data.source == "stdlib" and len(data.train) > 0


def test_bloom_measured_from_its_discovered_structure(tmp_path, text_file, capsys):
    """Bloom was refused before structure discovery ("not a supported architecture")."""
    folder = hf_folder(tmp_path, "bloom")
    out = tmp_path / "b.json"
    argv = [str(folder), "--data", str(text_file), "--seq-len", "16", "--max-tokens", "64"]
    assert main(["measure", *argv, "--json", str(out)]) == 0
    assert "structure: 2 blocks at transformer.h (discovered)" in capsys.readouterr().out
    names = [p["name"] for p in json.loads(out.read_text())["points"]]
    assert names == ["embed.resid_post", "blocks.0.resid_post", "blocks.1.resid_post"]
    assert main(["measure", *argv, "--points", "transformer.h.*", "--json", str(out)]) == 0
    assert len(json.loads(out.read_text())["points"]) == 2
