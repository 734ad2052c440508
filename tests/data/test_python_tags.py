"""Python source tagged by lexical category (``jaxformer.data.python_tags``): the labels against
a hand-labelled snippet and a naive recomputation, the rows' purity and determinism, and the
training/held-out split."""

from __future__ import annotations

import io
import keyword
import tokenize

import numpy as np
import pytest

from jaxformer.data.errors import DataError
from jaxformer.data.python_tags import (
    CATEGORIES,
    PythonTags,
    char_categories,
    encode_with_offsets,
    subword_labels,
    tag_documents,
)
from jaxformer.data.tokenizer import train_tokenizer
from tests.corpus import document

# One letter per character: k keyword, n name, 0 number, s string, o operator, c comment,
# . none (whitespace, line breaks). Written by hand from the Python grammar.
SNIPPET = ('if x1 >= 0x1F:  # hi\n'
           '    s = f"ab" + \'c\\n\'  \n'
           'match = [None, 2.5e-3]\r\n'
           '"""doc\n'
           'string"""\n')
LETTERS = ('kk.nn.oo.0000o..cccc.'
           '....n.o.sssss.o.sssss...'
           'nnnnn.o.okkkko.000000o..'
           'sssssss'
           'sssssssss.')
CODE = {"k": 0, "n": 1, "0": 2, "s": 3, "o": 4, "c": 5, ".": -1}


def test_character_categories_match_a_hand_labelled_snippet():
    assert CATEGORIES == ("keyword", "name", "number", "string", "operator", "comment")
    assert len(LETTERS) == len(SNIPPET)
    got = char_categories(SNIPPET)
    want = np.array([CODE[c] for c in LETTERS])
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("text", ["x = (1,\n", "def f():\n  x\n y\n", '"""never closed\n'])
def test_source_tokenize_refuses_has_no_categories(text):
    assert char_categories(text) is None


def test_subword_label_is_its_first_categorized_character():
    cats = np.array([-1, 0, 0, -1, -1, 4, 3, 3, -1])
    offsets = np.array([[0, 1],   # whitespace only -> unlabelled
                        [0, 3],   # " kk" -> keyword
                        [3, 5],   # whitespace -> unlabelled
                        [4, 7],   # " os" straddles operator and string -> operator
                        [6, 9],   # "s s." -> string
                        [7, 7],   # empty span -> unlabelled
                        [8, 9]])  # trailing whitespace
    np.testing.assert_array_equal(subword_labels(cats, offsets), [-1, 0, -1, 4, 3, -1, -1])


def naive_labels(text: str, offsets: np.ndarray) -> list[int]:
    """Each subword's label from tokenize's tokens directly: the category of the earliest
    labelled lexical token that overlaps the subword's span (lines by str.splitlines)."""
    starts = np.cumsum([0] + [len(line) for line in text.split("\n")[:-1]]) + np.arange(
        text.count("\n") + 1)  # offset of each line: lengths plus one "\n" each
    spans = []
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.NAME:
            cat = 0 if keyword.iskeyword(tok.string) else 1
        else:
            cat = {tokenize.NUMBER: 2, tokenize.STRING: 3, tokenize.OP: 4,
                   tokenize.COMMENT: 5}.get(tok.type)
        if cat is not None:
            a = starts[tok.start[0] - 1] + tok.start[1]
            spans.append((a, starts[tok.end[0] - 1] + tok.end[1], cat))
    out = []
    for s, e in offsets:
        hits = [(a, cat) for a, b, cat in spans if a < e and b > s]
        out.append(min(hits)[1] if hits else -1)
    return out


@pytest.fixture(scope="module")
def tokenizer():
    rng = np.random.default_rng(0)
    return train_tokenizer([document(rng, i) for i in range(30)] + [SNIPPET], 300)


def test_subword_labels_of_real_documents_match_a_naive_recomputation(tokenizer):
    import json
    import sysconfig
    from pathlib import Path

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [SNIPPET, document(np.random.default_rng(5), 99),
             (stdlib / "keyword.py").read_text(), (stdlib / "colorsys.py").read_text(),
             Path(json.__file__).read_text()]
    tagged = tag_documents(tokenizer, texts)
    assert sorted(tagged) == list(range(len(texts)))
    for i, ((ids, offsets), text) in enumerate(zip(encode_with_offsets(tokenizer, texts), texts,
                                                    strict=True)):
        np.testing.assert_array_equal(tagged[i][0], ids)
        want = naive_labels(text, offsets)
        np.testing.assert_array_equal(tagged[i][1], want, err_msg=f"document {i}")
        # every category that the text has shows up (a test of the test's reference too)
        assert set(want) - {-1} == set(np.unique(char_categories(text))) - {-1}, i


def synthetic_tags(n_train: int = 5, n_val: int = 3, seq_len: int = 8) -> PythonTags:
    """Training documents of ids 10..19 and held-out ones of ids 20..29, of varied lengths
    (some shorter than a row), labels = id % 6 with every fourth token unlabelled."""
    rng = np.random.default_rng(1)

    def doc(lo):
        n = int(rng.integers(3, 30))
        ids = rng.integers(lo, lo + 10, n).astype(np.int32)
        labels = np.where(np.arange(n) % 4 == 3, -1, ids % 6).astype(np.int32)
        return ids, labels

    return PythonTags([doc(10) for _ in range(n_train)], [doc(20) for _ in range(n_val)],
                      seq_len, pad_id=1)


def test_rows_keep_training_and_held_out_documents_apart():
    data = synthetic_tags()
    for step in range(40):
        batch = data.train_batch(step, 4, seed=3)
        real = batch["segment_ids"] > 0
        assert ((batch["inputs"][real] >= 10) & (batch["inputs"][real] < 20)).all()
        assert (batch["inputs"][~real] == 1).all() and (batch["loss_weights"][~real] == 0).all()
    seen = []
    for batch in data.val_batches(3):
        real = batch["segment_ids"] > 0
        w = batch["loss_weights"] > 0
        assert (batch["inputs"][w] >= 20).all()
        seen += batch["inputs"][w].tolist()
    # every labelled held-out token exactly once
    want = sorted(int(i) for ids, lab in data.val_docs for i in ids[lab >= 0])
    assert sorted(seen) == want


def test_targets_and_weights_follow_the_labels():
    data = synthetic_tags()
    batch = data.train_batch(0, 16, seed=0)
    w = batch["loss_weights"]
    assert set(np.unique(w)) == {0.0, 1.0}
    real = batch["segment_ids"] > 0
    labelled = w > 0
    np.testing.assert_array_equal(batch["targets"][labelled], batch["inputs"][labelled] % 6)
    assert labelled[real].mean() < 0.9  # the unlabelled fourth tokens are weight 0


def test_a_row_is_a_pure_function_of_seed_step_and_row():
    data, again = synthetic_tags(), synthetic_tags()
    full = data.train_batch(7, 6, seed=2)
    for key, value in again.train_batch(7, 6, seed=2).items():
        np.testing.assert_array_equal(value, full[key])
    share = data.train_batch(7, 6, seed=2, rows=range(2, 4))  # one process's share
    for key, value in share.items():
        np.testing.assert_array_equal(value, full[key][2:4])
    other = data.train_batch(8, 6, seed=2)
    assert not np.array_equal(other["inputs"], full["inputs"])


def test_majority_baseline_is_the_most_frequent_training_category_on_held_out_tokens():
    data = synthetic_tags()
    train_labels = np.concatenate([lab for _, lab in data.train_docs])
    majority = np.bincount(train_labels[train_labels >= 0]).argmax()
    val_labels = np.concatenate([lab for _, lab in data.val_docs])
    val_labels = val_labels[val_labels >= 0]
    assert data.majority_baseline(3) == pytest.approx(np.mean(val_labels == majority))


def test_no_python_document_is_a_data_error(tokenizer):
    texts = ["x = (1,\n", "Just ( prose that never closes\n"]
    tagged = tag_documents(tokenizer, texts)
    assert tagged == {}
    with pytest.raises(DataError, match="tokenize accepted no training document"):
        PythonTags.create(tagged, len(texts), [0], [1], 8, 1, log=lambda s: None)
