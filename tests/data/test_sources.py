"""Loading documents from files, directories, the stdlib corpus and (failing) Hub names."""

import json
import os
import re

import pytest

from jaxformer.data.errors import DataError
from jaxformer.data.sources import STDLIB, load_documents, stdlib_files
from jaxformer.data.stdlib_corpus import stdlib_root
from jaxformer.errors import UserError


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("alpha doc\n\tindented\n")
    (d / "b.txt").write_text("beta doc ü 🐍")
    (d / "bad.bin").write_bytes(b"latin-1 \xff\xfe caf\xe9")  # not UTF-8
    (d / "blank.txt").write_text("  \n\n")  # whitespace only: no document
    lines = [{"text": "json one", "id": 1}, {"text": "   ", "id": 2}, {"text": "json two", "id": 3}]
    (d / "sub" / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    (d / ".hidden.txt").write_text("hidden file")
    (d / ".git").mkdir()
    (d / ".git" / "config").write_text("hidden dir")
    return d


def load(path, tmp_path, **kw):
    return load_documents(str(path), cache_dir=str(tmp_path / "hf"), **kw)


def test_directory_documents_in_file_order(data_dir, tmp_path):
    docs = load(data_dir, tmp_path)
    assert docs.texts == ["alpha doc\n\tindented\n", "beta doc ü 🐍", "json one", "json two"]
    assert docs.n_skipped == 2 and docs.n_files == 5  # the hidden files are not listed
    assert docs.skipped == [str(data_dir / "bad.bin"), str(data_dir / "blank.txt")]
    assert docs.skip_reasons == ["not UTF-8", "empty"]
    assert re.fullmatch(r"[0-9a-f]{64}", docs.fingerprint), docs.fingerprint  # a sha256


def test_single_file_and_other_text_field(data_dir, tmp_path):
    assert load(data_dir / "b.txt", tmp_path).texts == ["beta doc ü 🐍"]
    f = data_dir / "records.jsonl"
    f.write_text('{"body": "x = 1", "text": 5}\n{"body": "y = 2", "text": 6}\n')
    assert load(f, tmp_path, text_field="body").texts == ["x = 1", "y = 2"]
    with pytest.raises(DataError, match="records.jsonl.*int"):
        load(f, tmp_path)


def test_fingerprint_tracks_file_changes(data_dir, tmp_path):
    first = load(data_dir, tmp_path).fingerprint
    assert load(data_dir, tmp_path).fingerprint == first
    (data_dir / "a.txt").write_text("alpha doc, edited and longer\n")
    changed = load(data_dir, tmp_path)
    assert changed.fingerprint != first
    assert changed.texts[0] == "alpha doc, edited and longer\n"
    # The JSON field selects different documents, so it is part of the fingerprint.
    (data_dir / "sub" / "c.jsonl").write_text('{"text": "t", "other": "o"}\n')
    a = load(data_dir, tmp_path)
    b = load(data_dir, tmp_path, text_field="other")
    assert a.fingerprint != b.fingerprint and b.texts[-1] == "o"


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "data"
    with pytest.raises(DataError, match=f"{re.escape(str(missing))} does not exist"):
        load(missing, tmp_path)


def test_empty_directory(tmp_path):
    empty = tmp_path / "empty"
    (empty / ".hidden").mkdir(parents=True)
    (empty / ".hidden" / "x.txt").write_text("ignored")
    with pytest.raises(DataError, match=f"{re.escape(str(empty))} contains no"):
        load(empty, tmp_path)


def test_all_files_bad(tmp_path):
    d = tmp_path / "binary"
    d.mkdir()
    for i in range(3):
        (d / f"f{i}.dat").write_bytes(bytes([0xFF, 0xC0, i]))
    with pytest.raises(DataError, match=f"{re.escape(str(d))}: all 3 files are not valid UTF-8"):
        load(d, tmp_path)


def test_no_non_empty_documents(tmp_path):
    d = tmp_path / "blank"
    d.mkdir()
    (d / "a.txt").write_text("   \n")
    (d / "b.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    with pytest.raises(DataError, match=f"no non-empty documents in {re.escape(str(d))}"):
        load(d, tmp_path)


def test_jsonl_without_text_field_names_the_file(tmp_path):
    d = tmp_path / "json"
    d.mkdir()
    (d / "ok.jsonl").write_text('{"text": "fine"}\n')
    (d / "wrong.jsonl").write_text('{"content": "a"}\n{"content": "b"}\n')
    with pytest.raises(DataError, match=r"wrong\.jsonl has no 'text' field \(fields: content\)"):
        load(d, tmp_path)


def test_invalid_json_is_a_data_error(tmp_path):
    f = tmp_path / "broken.jsonl"
    f.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match="broken.jsonl"):
        load(f, tmp_path)


def test_hub_failure_is_wrapped(monkeypatch):
    import datasets

    def fail(name, **kwargs):  # stands in for the Hub: tests never go online
        raise ConnectionError(f"cannot reach the Hub for {name}\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="'someone/no-such-data'.*ConnectionError") as info:
        load_documents("someone/no-such-data")
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UserError)


def test_hub_dataset_text_field(monkeypatch):
    import datasets

    fake = datasets.Dataset.from_dict({"text": ["one", " ", None, "two"], "n": [1, 2, 3, 4]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: fake)
    docs = load_documents("owner/name")
    assert docs.texts == ["one", "two"] and docs.n_skipped == 0
    assert docs.fingerprint != load_documents("owner/other").fingerprint
    with pytest.raises(DataError, match="owner/name has no 'body' field"):
        load_documents("owner/name", text_field="body")


def test_stdlib_files():
    files = stdlib_files()
    root = stdlib_root()
    rel = [f.relative_to(root).as_posix() for f in files]
    assert len(files) > 100
    assert "json/decoder.py" in rel and "os.py" in rel
    assert files == sorted(files)
    assert all(f.suffix == ".py" for f in files)
    excluded = {"test", "tests", "idlelib", "lib2to3", "site-packages", "__pycache__"}
    assert not any(excluded & set(r.split("/")[:-1]) for r in rel)
    size = sum(os.path.getsize(f) for f in files)
    assert 2e6 < size < 30e6, f"stdlib corpus is {size / 1e6:.1f} MB"


def test_stdlib_source(monkeypatch, tmp_path):
    # Restrict to a few files to keep the test fast; the loading path is the same.
    import jaxformer.data.sources as sources

    few = [f for f in stdlib_files() if f.name in ("decoder.py", "this.py", "keyword.py")]
    monkeypatch.setattr(sources, "stdlib_files", lambda: few)
    docs = load_documents(STDLIB, cache_dir=str(tmp_path))
    assert len(docs.texts) == len(few) >= 3
    assert docs.texts[0] == few[0].read_text()
