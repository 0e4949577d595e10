"""Corpus collection, deduplication, the stable split and the fingerprint."""

import json

import pytest

from outlierlab.data import DataConfig
from outlierlab.data.corpus import Document, collect, split_documents
from outlierlab.errors import ConfigError, DataError


def make_corpus(root, n=40):
    """A folder of small, distinct Python files (plus a duplicate, an empty and a binary file)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sub = root / f"pkg{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"mod{i}.py").write_text(
            f"def f{i}(x):\n    return x * {i} + {i * i}\n" * (1 + i % 4)
        )
    (root / "dup.py").write_text((root / "pkg0" / "mod0.py").read_text())
    (root / "empty.py").write_text("")
    (root / "blob.bin").write_bytes(b"\xff\xfe\x00\x81" * 10)
    (root / ".hidden").write_text("never read")
    return root


def test_folder_dedupes_and_skips_non_utf8(tmp_path):
    c = collect(str(make_corpus(tmp_path / "src")))
    names = [d.name for d in c.documents]
    assert len(names) == 40 and names == sorted(names)
    assert c.duplicates == 1 and c.empty == 1
    assert c.skipped_non_utf8 == ["blob.bin"]
    assert ".hidden" not in names
    assert "dup.py" in names and "pkg0/mod0.py" not in names  # first name in sorted order wins


def test_split_is_disjoint_stable_and_independent_of_other_files(tmp_path):
    docs = collect(str(make_corpus(tmp_path / "src", n=200))).documents
    train, val = split_documents(docs, 0.1)
    tn, vn = {d.name for d in train}, {d.name for d in val}
    assert not tn & vn and len(tn | vn) == len(docs)
    assert 5 <= len(val) <= 40  # about 10% of 200
    _, val2 = split_documents(list(reversed(docs)), 0.1)
    assert [d.name for d in val2] == [d.name for d in val]
    # a file's side does not depend on the rest of the corpus
    _, val_half = split_documents(docs[:100], 0.1)
    assert {d.name for d in val_half} == vn & {d.name for d in docs[:100]}


def test_split_keeps_one_document_each_side():
    docs = [Document(f"f{i}", "x") for i in range(3)]
    train, val = split_documents(docs, 0.01)
    assert len(val) == 1 and len(train) == 2


def test_single_file_is_cut_at_a_line(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text("".join(f"line {i}\n" for i in range(100)))
    c = collect(str(p))
    train, val = split_documents(c.documents, 0.1)
    assert train[0].text + val[0].text == p.read_text()
    assert train[0].text.endswith("\n") and val[0].text.startswith("line 9")


def test_stdlib_excludes_tests_and_site_packages():
    c = collect("stdlib")
    names = [d.name for d in c.documents]
    assert "os.py" in names and "json/decoder.py" in names
    assert not any(n.startswith(("test/", "site-packages/")) for n in names)
    assert not any("/tests/" in n or "idle_test" in n for n in names)
    assert len({d.digest for d in c.documents}) == len(names)


def test_glob_source(tmp_path):
    make_corpus(tmp_path / "src")
    c = collect(str(tmp_path / "src" / "pkg1" / "*.py"))
    assert c.kind == "glob" and len(c.documents) == 13
    assert all(d.name.startswith("mod") for d in c.documents)


def test_jsonl(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "hello"}\n\n{"text": "world", "id": 2}\n')
    c = collect(str(p))
    assert [d.text for d in c.documents] == ["hello", "world"]
    assert [d.name for d in c.documents] == ["d.jsonl:1", "d.jsonl:3"]
    assert [d.text for d in collect(str(p), text_field="text").documents] == ["hello", "world"]


def test_jsonl_missing_field_names_field_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2 has no 'text' field"):
        collect(str(p))
    with pytest.raises(DataError, match=r"d\.jsonl:1 has no .content."):
        collect(str(p), text_field="content")


def test_jsonl_bad_json(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2 is not valid JSON"):
        collect(str(p))


def test_datasets_folder_without_datasets_says_install_extra(tmp_path):
    pytest.importorskip("numpy")
    try:
        import datasets  # noqa: F401

        pytest.skip("datasets is installed")
    except ImportError:
        pass
    d = tmp_path / "hf"
    d.mkdir()
    (d / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    with pytest.raises(
        DataError, match=r"needs the `datasets` extra: pip install 'outlierlab\[datasets\]'"
    ):
        collect(str(d))


def test_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nowhere\.txt does not exist"):
        collect(str(tmp_path / "nowhere.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\xff\xfe")
    with pytest.raises(DataError, match=r"bad\.txt is not UTF-8"):
        collect(str(bad))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(DataError, match="holds no non-empty UTF-8 documents"):
        collect(str(empty))
    with pytest.raises(DataError, match="matches no files"):
        collect(str(tmp_path / "*.nothing"))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"val_fraction": 0.0},
        {"val_fraction": 1.5},
        {"vocab_size": 100},
        {"tokenizer": ""},
        {"include_tests": "yes"},
        {"vocab_size": 1.5},
    ],
)
def test_config_validation(kwargs):
    with pytest.raises(ConfigError):
        DataConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = DataConfig(source="x.jsonl", tokenizer="bpe", vocab_size=300)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown data field"):
        DataConfig.from_dict({"sourec": "stdlib"})
