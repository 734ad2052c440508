"""Packing documents into rows: exact values on a hand-built stream, and coverage invariants."""

from collections import Counter

import numpy as np
import pytest

from jaxformer.data.errors import DataError
from jaxformer.data.packing import (
    PackedRows,
    TokenStream,
    make_stream,
    num_rows,
    pad_batch,
    row_batch,
    split_documents,
)

EOS = 0


def hand_stream() -> TokenStream:
    """Docs [10 11 12], [20 21], [30 31 32 33], in that order, each followed by EOS (0)."""
    tokens = [10, 11, 12, 0, 20, 21, 0, 30, 31, 32, 33, 0]
    doc_ids = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    return TokenStream(np.array(tokens, np.int32), np.array(doc_ids, np.int32))


def random_stream(n_docs: int, seed: int, max_len: int = 12) -> TokenStream:
    """Docs of random lengths; every token is unique (its stream position + 1), EOS is 0."""
    rng = np.random.default_rng(seed)
    docs = [np.zeros(int(n), np.int32) for n in rng.integers(1, max_len, n_docs)]
    stream = make_stream(docs, EOS, order_seed=seed)
    tokens = np.where(stream.tokens == EOS, EOS, np.arange(1, len(stream) + 1))
    return TokenStream(tokens.astype(np.int32), stream.doc_ids)


def test_row_batch_matches_hand_computed_values():
    b = row_batch(hand_stream(), np.array([0, 1]), seq_len=5)
    # Row 0 = stream[0:6], row 1 = stream[5:11]; stream[11] (the last EOS) is in no target.
    np.testing.assert_array_equal(b.inputs, [[10, 11, 12, 0, 20], [21, 0, 30, 31, 32]])
    np.testing.assert_array_equal(b.targets, [[11, 12, 0, 20, 21], [0, 30, 31, 32, 33]])
    np.testing.assert_array_equal(b.segment_ids, [[1, 1, 1, 1, 2], [1, 1, 2, 2, 2]])
    # Positions restart at the row start: token 21 is 2nd in its doc but 1st in row 1.
    np.testing.assert_array_equal(b.positions, [[0, 1, 2, 3, 0], [0, 1, 0, 1, 2]])
    # EOS -> next doc's first token is not trained; last token -> its EOS is.
    np.testing.assert_array_equal(b.loss_weights, [[1, 1, 1, 0, 1], [1, 0, 1, 1, 1]])
    assert b.inputs.dtype == b.targets.dtype == b.segment_ids.dtype == np.int32
    assert b.positions.dtype == np.int32 and b.loss_weights.dtype == np.float32
    assert set(b.as_dict()) == {"inputs", "targets", "segment_ids", "positions", "loss_weights"}


def test_row_batch_rows_in_any_order_and_repeated():
    stream = hand_stream()
    b = row_batch(stream, np.array([1, 0, 1]), seq_len=5)
    ref = row_batch(stream, np.array([0, 1]), seq_len=5)
    for name, value in b.as_dict().items():
        np.testing.assert_array_equal(value, ref.as_dict()[name][[1, 0, 1]])
    with pytest.raises(IndexError):
        row_batch(stream, np.array([2]), seq_len=5)


@pytest.mark.parametrize("seq_len", [1, 4, 7, 16])
def test_weights_never_cross_documents_and_cover_each_pair_once(seq_len):
    stream = random_stream(n_docs=30, seed=seq_len)
    R = num_rows(len(stream), seq_len)
    b = row_batch(stream, np.arange(R), seq_len)
    weighted = Counter()
    for r in range(R):
        for c in range(seq_len):
            j = r * seq_len + c  # stream position of the input
            # Weight 1 <=> input and target are in the same document.
            assert b.loss_weights[r, c] == float(stream.doc_ids[j] == stream.doc_ids[j + 1])
            if b.loss_weights[r, c]:
                weighted[(int(b.inputs[r, c]), int(b.targets[r, c]))] += 1
    # Every within-document pair (stream[j-1], stream[j]) with j <= R*T is weighted exactly once,
    # including those straddling two rows (rows overlap by one token).
    expected = Counter(
        (int(stream.tokens[j - 1]), int(stream.tokens[j]))
        for j in range(1, R * seq_len + 1)
        if stream.doc_ids[j] == stream.doc_ids[j - 1]
    )
    assert weighted == expected
    assert sum(weighted.values()) == int(b.loss_weights.sum())
    # Only the tail, shorter than one row, is left out.
    assert len(stream) - 1 - R * seq_len < seq_len


def test_segments_and_positions_follow_documents():
    stream = random_stream(n_docs=50, seed=3)
    T = 9
    b = row_batch(stream, np.arange(num_rows(len(stream), T)), T)
    assert b.segment_ids.min() == 1  # 0 is reserved for padding
    for r in range(len(b.inputs)):
        docs = stream.doc_ids[r * T : r * T + T]
        # segment = 1 + (number of document changes so far in the row)
        np.testing.assert_array_equal(b.segment_ids[r], 1 + docs - docs[0])
        for c in range(T):
            start = c
            while start > 0 and docs[start - 1] == docs[c]:
                start -= 1
            assert b.positions[r, c] == c - start


def test_make_stream_shuffles_documents_and_appends_eos():
    docs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6]), np.array([7, 8, 9, 10])]
    s = make_stream(docs, eos_id=0, order_seed=1)
    assert len(s) == 10 + 4
    assert s.tokens.dtype == np.int32 and s.doc_ids.dtype == np.int32
    # Split on EOS: each piece is one document, with doc ids 0, 1, 2, 3 in stream order.
    ends = np.flatnonzero(s.tokens == 0)
    pieces = np.split(s.tokens, ends + 1)[:-1]
    assert sorted(tuple(p[:-1]) for p in pieces) == sorted(tuple(d) for d in docs)
    for k, piece_ids in enumerate(np.split(s.doc_ids, ends + 1)[:-1]):
        assert set(piece_ids.tolist()) == {k}
    order = tuple(tuple(p[:-1]) for p in pieces)
    again = make_stream(docs, eos_id=0, order_seed=1)
    np.testing.assert_array_equal(again.tokens, s.tokens)
    orders = {
        tuple(tuple(p[:-1]) for p in np.split(t, np.flatnonzero(t == 0) + 1)[:-1])
        for t in (make_stream(docs, 0, seed).tokens for seed in range(10))
    }
    assert len(orders) > 1, "the document order must depend on the seed"
    assert order in orders


def test_split_documents_is_by_document_and_deterministic():
    train, val = split_documents(100, 0.1, seed=7)
    assert len(val) == 10 and len(train) == 90
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(100))
    train2, val2 = split_documents(100, 0.1, seed=7)
    np.testing.assert_array_equal(val, val2)
    np.testing.assert_array_equal(train, train2)
    _, val3 = split_documents(100, 0.1, seed=8)
    assert set(val3.tolist()) != set(val.tolist())


def test_split_documents_edge_cases():
    train, val = split_documents(2, 0.01, seed=0)  # tiny fraction still holds one doc out
    assert len(train) == 1 and len(val) == 1
    train, val = split_documents(3, 0.9, seed=0)  # and always keeps one training doc
    assert len(train) == 1 and len(val) == 2
    train, val = split_documents(5, 0.0, seed=0)
    assert len(val) == 0 and len(train) == 5
    with pytest.raises(DataError, match="at least 2 documents"):
        split_documents(1, 0.1, seed=0)
    with pytest.raises(DataError, match="fraction"):
        split_documents(10, 1.0, seed=0)


def test_packed_rows_count_and_too_long_sequence():
    stream = hand_stream()  # 12 tokens
    assert PackedRows(stream, 5).n_rows == 2
    assert PackedRows(stream, 11).n_rows == 1
    with pytest.raises(DataError, match=r"sequence length 12 .*12 tokens.* needs 13"):
        PackedRows(stream, 12, "training")


def test_pad_batch_adds_zero_weight_rows():
    b = row_batch(hand_stream(), np.array([1]), seq_len=5)
    p = pad_batch(b, 3, pad_token=EOS)
    assert p.inputs.shape == (3, 5)
    np.testing.assert_array_equal(p.inputs[0], b.inputs[0])
    np.testing.assert_array_equal(p.inputs[1:], EOS)
    np.testing.assert_array_equal(p.loss_weights[1:], 0.0)
    np.testing.assert_array_equal(p.segment_ids[1:], 1)
    assert p.loss_weights.sum() == b.loss_weights.sum() == 4.0
    assert pad_batch(b, 1, EOS) is b


class CountingArray(np.ndarray):
    """An array that counts how often it, or an array indexed out of it, is indexed."""

    reads = [0]

    def __getitem__(self, key):
        self.reads[0] += 1
        return super().__getitem__(key)


def test_row_batch_is_vectorized():
    """A batch costs a fixed number of array operations, whatever its size: no Python loop
    over rows, documents or tokens (such a loop would index the stream per row or token)."""
    rng = np.random.default_rng(0)
    docs = [rng.integers(2, 8000, n).astype(np.int32) for n in rng.integers(10, 300, 200)]
    plain = make_stream(docs, EOS, order_seed=0)
    stream = TokenStream(plain.tokens.view(CountingArray), plain.doc_ids.view(CountingArray))
    n_rows = num_rows(len(stream), 128)

    def reads(batch_size: int) -> int:
        rows = rng.integers(0, n_rows, batch_size)
        CountingArray.reads[0] = 0
        b = row_batch(stream, rows, 128)
        count = CountingArray.reads[0]
        np.testing.assert_array_equal(b.inputs, row_batch(plain, rows, 128).inputs)
        assert b.inputs.shape == (batch_size, 128)
        return count

    assert 0 < reads(1) == reads(64) <= 12
