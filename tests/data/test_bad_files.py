"""Bad files are skipped and counted by reason; data manifests and how a change is described."""

import hashlib
import json
import os
import re
import shutil

import pytest

import jaxformer.data.sources as sources
from jaxformer import config as config_lib
from jaxformer.config import Config
from jaxformer.data.errors import DataError
from jaxformer.data.manifest import describe_change, hub_manifest, synthetic_manifest
from jaxformer.data.pipeline import DataPipeline
from jaxformer.data.sources import load_documents
from jaxformer.objectives.tasks import build_task
from tests.corpus import write_corpus


def load(path, tmp_path, **kw):
    return load_documents(str(path), cache_dir=str(tmp_path / "hf"), **kw)


def add_bad_files(d):
    """One file of each bad kind, named so that sorted order is unreadable, empty, binary,
    not UTF-8."""
    (d / "bad_0_gone.txt").symlink_to(d / "no-such-target.txt")  # a dangling link
    (d / "bad_1_empty.txt").write_text(" \n\t\n")
    (d / "bad_2_binary.txt").write_bytes(b"looks like text\x00but holds a NUL")  # valid UTF-8
    (d / "bad_3_latin1.txt").write_bytes(b"caf\xe9 au lait")


@pytest.fixture
def corpus(tmp_path):
    return write_corpus(tmp_path / "corpus", n_docs=6)


def test_each_bad_kind_is_skipped_and_counted(corpus, tmp_path):
    add_bad_files(corpus)
    os.mkfifo(corpus / "pipe")  # not a regular file: not listed (reading it would block)
    (corpus / "pipe_link").symlink_to(corpus / "pipe")
    docs = load(corpus, tmp_path)
    assert docs.texts == [(corpus / f"mod_{i:03d}.py").read_text() for i in range(6)]
    bad = ["bad_0_gone.txt", "bad_1_empty.txt", "bad_2_binary.txt", "bad_3_latin1.txt"]
    assert docs.skipped == [str(corpus / n) for n in bad]
    assert docs.skip_reasons == ["unreadable", "empty", "binary", "not UTF-8"]
    assert docs.n_skipped == 4 and docs.n_files == 10
    assert docs.skip_summary() == (
        "skipped 4 of 10 files: 1 unreadable, 1 empty, 1 binary, 1 not UTF-8; "
        f"e.g. {corpus / 'bad_0_gone.txt'}")


def test_a_file_gone_since_the_listing_is_unreadable(corpus, tmp_path):
    files = sorted(corpus.iterdir())
    files[0].unlink()  # vanishes between listing and reading
    (corpus / "subdir").mkdir()
    files.append(corpus / "subdir")  # replaced by a directory since the listing
    docs = sources._load_files(files, corpus, str(corpus), "text", str(tmp_path / "hf"))
    assert docs.skipped == [str(files[0]), str(corpus / "subdir")]
    assert docs.skip_reasons == ["unreadable", "unreadable"]
    assert len(docs.texts) == 5


def test_all_files_bad_is_one_line(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    add_bad_files(d)
    with pytest.raises(DataError) as info:
        load(d, tmp_path)
    assert str(info.value) == (
        f"no usable data in {d}: all 4 files were skipped: 1 unreadable, 1 empty, 1 binary, "
        f"1 not UTF-8 (e.g. {d / 'bad_0_gone.txt'}: No such file or directory)")
    for f in ("bad_1_empty.txt", "bad_2_binary.txt", "bad_3_latin1.txt"):
        (d / f).unlink()
    with pytest.raises(DataError, match=r"all 1 files are unreadable \(e\.g\. .*gone\.txt: No "):
        load(d, tmp_path)


def test_pipeline_log_line_counts_the_skipped_files(corpus, tmp_path):
    add_bad_files(corpus)
    messages = []
    p = DataPipeline.create(str(corpus), seq_len=16, vocab_size=300, val_fraction=0.2, seed=0,
                            cache_dir=tmp_path / "cache", log=messages.append)
    assert p.n_docs == 6 and p.n_skipped == 4
    assert messages[0].startswith(
        "data: 6 documents (skipped 4 of 10 files: 1 unreadable, 1 empty, 1 binary, "
        f"1 not UTF-8; e.g. {corpus / 'bad_0_gone.txt'}) from {corpus} in ")
    assert p.data_manifest == load(corpus, tmp_path).manifest


def test_manifest_lists_contents_and_ignores_mtime(corpus, tmp_path):
    (corpus / "sub").mkdir()
    (corpus / "sub" / "z.txt").write_bytes(b"nested")
    add_bad_files(corpus)
    first = load(corpus, tmp_path)
    m = first.manifest
    assert json.loads(json.dumps(m)) == m
    assert m["kind"] == "files" and m["source"] == str(corpus)
    by_path = {f["path"]: f for f in m["files"]}
    assert by_path["sub/z.txt"] == {"path": "sub/z.txt", "size": 6,
                                    "sha256": hashlib.sha256(b"nested").hexdigest()}
    assert by_path["bad_0_gone.txt"]["skipped"] == "unreadable"
    assert by_path["bad_1_empty.txt"]["skipped"] == "empty"
    assert len(m["files"]) == 11
    for f in corpus.rglob("*.py"):
        os.utime(f, (1e9, 1e9))  # touch: new mtimes, same bytes
    again = load(corpus, tmp_path)
    assert again.manifest == m and describe_change(m, again.manifest) is None
    assert again.fingerprint == first.fingerprint  # the cache key follows contents too


def test_describe_change(corpus, tmp_path):
    saved = load(corpus, tmp_path).manifest
    (corpus / "mod_000.py").write_text("edited\n")
    (corpus / "c.txt").write_text("new file\n")
    assert describe_change(saved, load(corpus, tmp_path).manifest) == (
        f"data source {corpus} changed since the run began: 1 file added (c.txt), "
        "1 changed (mod_000.py), 0 removed")

    saved = load(corpus, tmp_path).manifest
    for i in range(1, 6):
        (corpus / f"mod_{i:03d}.py").unlink()
    assert describe_change(saved, load(corpus, tmp_path).manifest) == (
        f"data source {corpus} changed since the run began: 0 files added, 0 changed, "
        "5 removed (mod_001.py, mod_002.py, mod_003.py and 2 more)")

    other = tmp_path / "other"
    shutil.copytree(corpus, other)
    assert describe_change(saved, load(other, tmp_path).manifest) == (
        f"data source changed from {corpus} to {other}")


def test_describe_change_of_hub_and_synthetic_sources():
    a, b = hub_manifest("o/n", "f1", "text"), hub_manifest("o/n", "f2", "text")
    assert describe_change(a, hub_manifest("o/n", "f1", "text")) is None
    assert describe_change(a, b) == (
        "data source o/n changed since the run began: fingerprint 'f1' -> 'f2'")
    assert describe_change(synthetic_manifest("synthetic:sort"),
                           synthetic_manifest("synthetic:reverse")) == (
        "data source changed from synthetic:sort to synthetic:reverse")


def test_hub_manifest_from_load(monkeypatch):
    import datasets

    fake = datasets.Dataset.from_dict({"text": ["one", "two"]})
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: fake)
    assert load_documents("owner/name").manifest == hub_manifest(
        "owner/name", fake._fingerprint, "text")


def test_tasks_carry_the_manifest(corpus, tmp_path):
    def cfg(*overrides: str) -> Config:
        return config_lib.apply_overrides(Config(), [
            "data.seq_len=24", "model.max_len=24", "model.vocab_size=300",
            f"data.cache_dir={tmp_path / 'cache'}", *overrides])

    text = build_task(cfg(f"data.source={corpus}"), tmp_path / "tok.json", lambda s: None)
    assert text.data_manifest == load(corpus, tmp_path).manifest
    assert re.fullmatch("[0-9a-f]{64}", text.data_manifest["files"][0]["sha256"])
    pairs = build_task(cfg("data.source=synthetic:reverse", "objective.kind=seq2seq",
                           "model.arch=encoder_decoder"), tmp_path / "tok2.json", lambda s: None)
    assert pairs.data_manifest == synthetic_manifest("synthetic:reverse")
