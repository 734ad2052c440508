"""DataPipeline: deterministic batches, document-level split, caching, baseline."""

import re
from collections import Counter

import numpy as np
import pytest

import jaxformer.data.packing as packing
import jaxformer.data.pipeline as pipeline_mod
from jaxformer.data.errors import DataError
from jaxformer.data.pipeline import DataPipeline

N_DOCS = 40
SEQ_LEN = 16
WORDS = ["alpha", "beta", "total", "count", "value", "index", "item", "data", "for", "in"]


def write_corpus(directory, n_docs: int = N_DOCS, seed: int = 0):
    """Python-like documents, each with a unique marker `doc_NNN`, plus one non-UTF-8 file."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_docs):
        lines = [f"# doc_{i:03d}"]
        for _ in range(int(rng.integers(2, 6))):
            a, b = rng.choice(WORDS, 2)
            lines.append(f"def {a}_{i}({b}):\n    return {b} * {int(rng.integers(100))}")
        (directory / f"mod_{i:03d}.py").write_text("\n".join(lines) + "\n")
    (directory / "binary.dat").write_bytes(b"\xff\xfe\x00bad")
    return directory


def create(source, cache_dir, log=None, **overrides):
    kwargs = dict(seq_len=SEQ_LEN, vocab_size=320, val_fraction=0.1, seed=0)
    kwargs.update(overrides)
    return DataPipeline.create(
        str(source), cache_dir=cache_dir, log=log or (lambda msg: None), **kwargs
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def pipe(corpus, tmp_path_factory):
    return create(corpus, tmp_path_factory.mktemp("cache"))


def markers(text: str) -> set[str]:
    return set(re.findall(r"doc_\d{3}", text))


def test_sizes_and_log(corpus, tmp_path):
    messages = []
    p = create(corpus, tmp_path, log=messages.append)
    assert p.n_docs == N_DOCS and p.n_skipped == 1
    assert len(p.val_doc_ids) == 4 and len(p.train_doc_ids) == 36
    assert 258 < p.vocab_size <= 320
    assert p.eos_id == 0 and p.pad_id == 1 and p.seq_len == SEQ_LEN
    assert p.n_train_rows == (p.n_train_tokens - 1) // SEQ_LEN
    assert p.n_val_rows == (p.n_val_tokens - 1) // SEQ_LEN
    # Every document is in exactly one stream, followed by one EOS.
    n_eos = np.sum(p.train_rows.stream.tokens == 0) + np.sum(p.val_rows.stream.tokens == 0)
    assert n_eos == N_DOCS
    assert len(messages) == 3 and all("\n" not in m for m in messages)
    assert (f"{N_DOCS} documents (skipped 1 of {N_DOCS + 1} files: 1 not UTF-8; "
            f"e.g. {corpus / 'binary.dat'}) from {corpus} in ") in messages[0]
    assert "trained on 36 training documents" in messages[1]


def test_validation_split_is_by_document(pipe):
    assert set(pipe.train_doc_ids.tolist()).isdisjoint(pipe.val_doc_ids.tolist())
    assert sorted([*pipe.train_doc_ids, *pipe.val_doc_ids]) == list(range(N_DOCS))
    train_text = pipe.decode(pipe.train_rows.stream.tokens)
    val_text = pipe.decode(pipe.val_rows.stream.tokens)
    assert len(markers(val_text)) == 4 and len(markers(train_text)) == 36
    assert markers(train_text).isdisjoint(markers(val_text))


def test_split_and_batches_are_deterministic_across_pipelines(pipe, corpus, tmp_path):
    other = create(corpus, tmp_path)  # fresh cache: tokenizer retrained from scratch
    np.testing.assert_array_equal(other.val_doc_ids, pipe.val_doc_ids)
    np.testing.assert_array_equal(other.val_rows.stream.tokens, pipe.val_rows.stream.tokens)
    for step in (3, 0, 250, 7):  # any order: a batch depends only on (seed, step)
        a, b = pipe.train_batch(step, 8, seed=5), other.train_batch(step, 8, seed=5)
        for name, value in a.as_dict().items():
            np.testing.assert_array_equal(value, b.as_dict()[name], err_msg=name)
    c = pipe.train_batch(3, 8, seed=6)
    assert not np.array_equal(c.inputs, pipe.train_batch(3, 8, seed=5).inputs)
    assert not np.array_equal(pipe.train_batch(4, 8, seed=5).inputs, a.inputs)
    other_split = create(corpus, tmp_path, seed=1)
    assert set(other_split.val_doc_ids.tolist()) != set(pipe.val_doc_ids.tolist())


def test_each_epoch_visits_every_row_once(pipe):
    R, B = pipe.n_train_rows, 7
    assert R % B != 0  # so that epochs change in the middle of a batch
    n_steps = -(-2 * R // B) + 1
    samples = np.concatenate([pipe.train_batch(s, B, seed=1).inputs for s in range(n_steps)])
    all_rows = pipe.train_rows.batch(np.arange(R)).inputs
    every_row = Counter(map(bytes, all_rows))
    epoch0, epoch1 = samples[:R], samples[R : 2 * R]
    assert Counter(map(bytes, epoch0)) == every_row
    assert Counter(map(bytes, epoch1)) == every_row
    assert not np.array_equal(epoch0, epoch1)  # reshuffled each epoch
    # The documented formula: sample i is row perm_e[i % R] of epoch e = i // R.
    i = 3 * B + 2
    perm = np.random.default_rng([1, i // R]).permutation(R)
    np.testing.assert_array_equal(samples[i], all_rows[perm[i % R]])


def test_process_slices_concatenate_to_the_global_batch(pipe, monkeypatch):
    global_batch = pipe.train_batch(11, 8, seed=2)
    for P in (2, 4, 8):
        parts = [
            pipe.train_batch(11, 8, seed=2, process_index=p, process_count=P) for p in range(P)
        ]
        for name, value in global_batch.as_dict().items():
            np.testing.assert_array_equal(np.concatenate([x.as_dict()[name] for x in parts]), value)
    built = []
    real = packing.row_batch
    monkeypatch.setattr(
        packing, "row_batch", lambda s, rows, T: built.append(len(rows)) or real(s, rows, T)
    )
    pipe.train_batch(11, 8, seed=2, process_index=1, process_count=4)
    assert built == [2]  # only this process's rows are gathered
    with pytest.raises(DataError, match="batch size 6 is not divisible by the 4 processes"):
        pipe.train_batch(0, 6, seed=2, process_index=0, process_count=4)


def test_val_batches_are_fixed_and_padded(pipe):
    B, R = 5, pipe.n_val_rows
    assert R % B != 0
    batches = list(pipe.val_batches(B))
    assert len(batches) == -(-R // B) == pipe.n_val_batches(B)
    assert all(b.inputs.shape == (B, SEQ_LEN) for b in batches)
    real = pipe.val_rows.batch(np.arange(R))
    for name, value in real.as_dict().items():
        got = np.concatenate([b.as_dict()[name] for b in batches])
        np.testing.assert_array_equal(got[:R], value, err_msg=name)
    pad = batches[-1]
    n_pad = len(batches) * B - R
    np.testing.assert_array_equal(pad.loss_weights[B - n_pad :], 0.0)
    np.testing.assert_array_equal(pad.segment_ids[B - n_pad :], 1)
    np.testing.assert_array_equal(pad.inputs[B - n_pad :], pipe.eos_id)
    again = list(pipe.val_batches(B))
    np.testing.assert_array_equal(again[0].inputs, batches[0].inputs)
    assert len(list(pipe.val_batches(B, max_batches=2))) == 2


def test_unigram_baseline_matches_direct_computation(pipe):
    counts = Counter(pipe.train_rows.stream.tokens.tolist())
    total = pipe.n_train_tokens + pipe.vocab_size  # add-one smoothing over the whole vocab
    losses = []
    for batch in pipe.val_batches(4):
        for t, w in zip(batch.targets.ravel(), batch.loss_weights.ravel(), strict=True):
            if w == 1.0:
                losses.append(-np.log((counts[int(t)] + 1) / total))
    assert len(losses) > 50
    assert pipe.unigram_baseline() == pytest.approx(np.mean(losses), rel=1e-9)
    # The baseline is better than uniform guessing (the model must beat it, not just this).
    assert pipe.unigram_baseline() < np.log(pipe.vocab_size)


def test_no_validation_data(corpus, tmp_path):
    p = create(corpus, tmp_path, val_fraction=0.0)
    assert p.n_val_rows == 0 and p.n_val_tokens == 0 and p.val_rows is None
    assert list(p.val_batches(4)) == []
    assert np.isnan(p.unigram_baseline())


def test_second_create_uses_the_cache(corpus, tmp_path, monkeypatch):
    calls = Counter()
    for name in ("train_tokenizer", "encode_documents"):
        real = getattr(pipeline_mod, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(pipeline_mod, name, counted)
    monkeypatch.setenv("JAXFORMER_CACHE", str(tmp_path / "env-cache"))
    first = create(corpus, None)  # cache dir from the environment variable
    assert calls == {"train_tokenizer": 1, "encode_documents": 1}
    cache = tmp_path / "env-cache"
    assert len(list((cache / "tokenizers").glob("*.json"))) == 1
    assert len(list((cache / "tokens").glob("*.npz"))) == 1
    assert not list(cache.rglob("*.tmp"))

    messages = []
    second = create(corpus, None, log=messages.append)
    assert calls == {"train_tokenizer": 1, "encode_documents": 1}  # nothing recomputed
    assert "cached" in messages[1] and "cached" in messages[2]
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    np.testing.assert_array_equal(second.train_rows.stream.tokens, first.train_rows.stream.tokens)
    np.testing.assert_array_equal(second.val_rows.stream.tokens, first.val_rows.stream.tokens)

    # Another vocab size is another tokenizer; changed data is other data.
    create(corpus, None, vocab_size=330)
    assert calls == {"train_tokenizer": 2, "encode_documents": 2}
    (corpus / "mod_000.py").write_text((corpus / "mod_000.py").read_text() + "# edit\n")
    try:
        create(corpus, None)
        assert calls == {"train_tokenizer": 3, "encode_documents": 3}
    finally:
        write_corpus(corpus)  # restore for the other tests (same content, new mtimes)


def test_damaged_token_cache_is_recomputed(corpus, tmp_path):
    first = create(corpus, tmp_path)
    [entry] = (tmp_path / "tokens").glob("*.npz")
    entry.write_bytes(b"truncated")
    again = create(corpus, tmp_path)
    np.testing.assert_array_equal(again.train_rows.stream.tokens, first.train_rows.stream.tokens)
    assert entry.stat().st_size > 100


def test_tokenizer_path_is_loaded_not_written(corpus, tmp_path, monkeypatch):
    first = create(corpus, tmp_path / "c1")
    path = tmp_path / "run" / "tokenizer.json"
    p = create(corpus, tmp_path / "c2", tokenizer_path=path)
    assert not path.parent.exists()  # the caller decides when the run dir is written
    path.parent.mkdir()
    path.write_text(first.tokenizer.to_str())

    def no_training(*args, **kwargs):
        raise AssertionError("tokenizer must be loaded, not trained")

    monkeypatch.setattr(pipeline_mod, "train_tokenizer", no_training)
    messages = []
    # A different vocab size on resume: the saved tokenizer wins, and the log says so.
    resumed = create(
        corpus, tmp_path / "c3", tokenizer_path=path, vocab_size=500, log=messages.append
    )
    assert resumed.tokenizer.to_str() == first.tokenizer.to_str() == p.tokenizer.to_str()
    assert "loaded from" in messages[1] and "overrides the requested vocab size 500" in messages[1]


def test_encode_decode_round_trip(pipe):
    text = "def total_9(value):\n\treturn value * 3  # ünïcode 🐍\n"
    ids = pipe.encode(text)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert pipe.decode(ids) == text
    assert pipe.decode([*ids.tolist(), pipe.eos_id]) == text + "<|endoftext|>"
    assert pipe.decode([*ids.tolist(), pipe.eos_id], skip_special_tokens=True) == text


def test_user_errors(corpus, tmp_path):
    with pytest.raises(DataError, match=r"sequence length 100000 is longer than the training data"):
        create(corpus, tmp_path, seq_len=100_000)
    with pytest.raises(DataError, match="vocab size 100 is too small"):
        create(corpus, tmp_path, vocab_size=100)
    with pytest.raises(DataError, match="does not exist"):
        create(tmp_path / "missing", tmp_path)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("only document")
    with pytest.raises(DataError, match="at least 2 documents"):
        create(one, tmp_path)
