"""GGUF input beyond Llama: for each architecture transformers' GGUF loader reads, a tiny HF model
written as a GGUF file here (tests/integration/tiny_gguf.py, llama.cpp's layout) loads through
``load_model`` with the same logits and a working tokenizer, and ``measure`` runs on it.

Not here (docs/real-models.md "GGUF architectures"): deci (no transformers model class), gpt_oss
(transformers cannot map its experts: refused, tested below), gemma4 (not written yet), t5 / umt5
(not causal LMs).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from outlierlab.cli import main

pytest.importorskip("transformers")
pytest.importorskip("gguf")
pytestmark = pytest.mark.hf

from tiny_gguf import ARCHS, EOS, GGUF_ARCH, tiny_hf, write_gguf  # noqa: E402

TEXT = "\n\n".join(
    f"Paragraph {i}: the quick brown fox jumps over the lazy dog; {i * 7919 % 1000} apples, "
    f"{'ünïcödé ' * (i % 3)}and a tab\there.\n    indented code = [{i}, {i + 1}]"
    for i in range(40)
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module", params=ARCHS)
def written(request, tmp_path_factory):
    """``(arch, HF model, its GGUF file)``."""
    arch = request.param
    model = tiny_hf(arch)
    path = write_gguf(model, tmp_path_factory.mktemp(arch) / f"tiny-{arch}.gguf")
    return arch, model, path


def test_gguf_loads_as_the_hf_model(written):
    from outlierlab.loading import load_model

    arch, ref, path = written
    loaded = load_model(path)
    assert loaded.kind == "gguf" and loaded.path == path and not loaded.model.training
    torch.manual_seed(1)
    x = torch.randint(0, EOS, (2, 48))  # long enough for rotary settings to show
    with torch.no_grad():
        want = ref(input_ids=x).logits
    # logits are O(10); llama.cpp stores Qwen3.5's A = -exp(A_log), whose float32 round trip
    # (1e-7) the MoE routing amplifies to ~5e-4
    atol = 2e-3 if arch == "qwen3_5_moe_text" else 1e-4
    torch.testing.assert_close(loaded.logits(x), want, rtol=0, atol=atol)
    tok = loaded.tokenizer
    assert tok.eot_id == EOS
    assert tok.encode("ab") == [ord("a"), ord("b")]
    ids = tok.encode(TEXT[:300])
    assert tok.decode(ids) == TEXT[:300] and max(ids) < EOS


def test_the_kept_conversion_loads_as_the_same_model(written, gguf_cache, monkeypatch):
    """The second load reads the cached HF folder (conversion not run), same logits and tokens."""
    from outlierlab import gguf
    from outlierlab.loading import load_model

    _, _, path = written
    first = load_model(path)
    entry = gguf.cached(path)
    assert (entry / gguf.SOURCE_FILE).is_file() and "kept in" in first.describe()

    def no_conversion(*a, **k):
        raise AssertionError("converted again although the entry is there")

    monkeypatch.setattr(gguf, "_load", no_conversion)
    again = load_model(path)
    assert type(again.model) is type(first.model) and again.seq_len == first.seq_len
    torch.manual_seed(1)
    x = torch.randint(0, EOS, (2, 48))
    with torch.no_grad():
        torch.testing.assert_close(again.logits(x), first.logits(x), rtol=0, atol=0)
    text = "Paragraph 3: ünïcödé and a tab\there"
    assert again.tokenizer.encode(text) == first.tokenizer.encode(text)
    assert again.tokenizer.eot_id == first.tokenizer.eot_id


def test_hyperparameters_transformers_leaves_unread_come_from_the_file(written, monkeypatch):
    import sys

    from outlierlab import gguf
    from outlierlab.loading import load_model

    arch, ref, path = written
    unread = gguf.unread_config(path)
    assert bool(unread) == (GGUF_ARCH.get(arch, arch) in gguf.UNREAD)
    with monkeypatch.context() as m:  # transformers < 5: the gguf package's reader
        m.setitem(sys.modules, "transformers.integrations.gguf", None)
        assert gguf.unread_config(path) == unread
    cfg = load_model(path).model.config
    for name, value in unread.items():
        rope = getattr(cfg, "rope_parameters", None) or {}
        got = rope[name] if name in rope else getattr(cfg, name)
        want = getattr(ref.config, name, None)
        want = (ref.config.rope_parameters or {})[name] if want is None else want
        assert got == pytest.approx(want) == pytest.approx(value), name


def test_measure_gguf(written, corpus, tmp_path, capsys):
    """measure finds the residual stream of every architecture from its structure."""
    _arch, ref, path = written
    out = tmp_path / "m.json"
    rc = main(["measure", str(path), "--max-tokens", "256", "--seq-len", "32",
               "--data", str(corpus), "--json", str(out)])  # fmt: skip
    assert rc == 0
    layers = getattr(ref.config, "num_hidden_layers", None) or ref.config.n_layer
    assert f"structure: {layers} blocks at " in capsys.readouterr().out
    rep = json.loads(out.read_text())
    assert rep["tokens"] == 256
    names = [p["name"] for p in rep["points"]]
    assert names == ["embed.resid_post"] + [f"blocks.{i}.resid_post" for i in range(layers)]
    assert all(math.isfinite(p["kurtosis"]) for p in rep["points"])


def test_weights_missing_from_the_file_are_an_error_not_a_random_model(tmp_path, monkeypatch):
    import tiny_gguf

    from outlierlab.errors import ModelLoadError
    from outlierlab.loading import load_model

    keep = tiny_gguf._tensors
    monkeypatch.setattr(tiny_gguf, "_tensors", lambda model, arch: (
        (name, arr) for name, arr in keep(model, arch) if name != "blk.1.ffn_down.weight"))
    path = write_gguf(tiny_hf("llama"), tmp_path / "holey.gguf")
    with pytest.raises(ModelLoadError, match=r"no weights in it for 1 LlamaForCausalLM param"):
        load_model(path)
    assert main(["measure", str(path)]) == 2


def test_gpt_oss_is_refused(tmp_path, capsys):
    """transformers maps none of llama.cpp's GPT-OSS expert tensors (its GptOssTensorProcessor
    looks for ``ffn_*_projs`` and writes ``block_sparse_moe.experts.N`` names the model lacks):
    the experts would be random. When this fails, transformers loads them: move gpt_oss to ARCHS."""
    path = write_gguf(tiny_hf("gpt_oss"), tmp_path / "oss.gguf")
    assert main(["measure", str(path)]) == 2
    err = capsys.readouterr().err
    assert "no weights in it for" in err and "experts" in err and len(err.splitlines()) == 1
