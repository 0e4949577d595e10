"""`outlierlab data prepare` end to end: real files, real cache, real tokenisers."""

import json
import os
import subprocess
import sys

import numpy as np

from outlierlab.cli import main


def make_corpus(root, n=30):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"m{i}.py").write_text(f"class C{i}:\n    value = {i}\n" * (2 + i % 3))
    return root


def test_prepare_prints_summary_and_reuses_cache(tmp_path, cache_dir, capsys):
    src = make_corpus(tmp_path / "src")
    assert main(["data", "prepare", "--source", str(src), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "files        30 (" in out and "tokenizer    bytes (vocab 257" in out
    assert str(cache_dir / "tokens") in out and "built in" in out
    assert main(["data", "prepare", "--source", str(src), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["built"] is False and s["files"] == 30
    folder = cache_dir / "tokens" / s["fingerprint"]
    train = np.fromfile(folder / "train.bin", dtype=np.uint16)
    assert len(train) == s["train_tokens"] and (train == 256).sum() == s["train_files"]


def test_prepare_bpe_json(tmp_path, cache_dir, capsys):
    src = make_corpus(tmp_path / "src")
    args = ["data", "prepare", "--source", str(src), "--tokenizer", "bpe", "--vocab-size", "280"]
    assert main([*args, "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["tokenizer"] == "bpe-280" and s["vocab_size"] == 280 and s["built"]
    assert (cache_dir / "tokens" / s["fingerprint"] / "tokenizer.json").is_file()


def test_bad_input_exits_2_with_one_line(tmp_path, cache_dir):
    bad = tmp_path / "d.jsonl"
    bad.write_text('{"body": "x"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "outlierlab", "data", "prepare", "--source", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "OUTLIERLAB_CACHE": str(cache_dir)},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "d.jsonl:1 has no 'text' field" in lines[0]
    assert lines[0].startswith("outlierlab data: error:")


def test_data_without_action_prints_usage(capsys):
    assert main(["data"]) == 2
    assert "prepare" in capsys.readouterr().out
