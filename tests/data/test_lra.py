"""The Long Range Arena-style sources (jaxformer.data.lra): the ListOps evaluator against
hand-worked values and an independent recursive evaluator, (seed, step)-determinism, held-out
sets disjoint from training, image rows against an independent upscaling of the digits, and
the one-line errors for a model that cannot hold a task."""

from __future__ import annotations

import statistics
import zlib
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from jaxformer import config as config_lib
from jaxformer.config import ConfigError
from jaxformer.data import lra
from jaxformer.data.errors import DataError
from jaxformer.data.pipeline import DataPipeline

# (expression, value worked out by hand)
HAND_WORKED = [
    ("7", 7),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 3 [MAX 1 8 ] 5 ]", 3),
    ("[MED 3 1 2 ]", 2),
    ("[MED 1 2 8 9 ]", 5),  # even count: int(np.median) = mean of 2 and 8, not a middle value
    ("[MED 2 5 ]", 3),  # 3.5 floored, as LRA's int(np.median(...))
    ("[SM 7 8 9 ]", 4),  # 24 mod 10
    ("[SM [MAX 5 6 ] [MED 1 9 ] 0 ]", 1),  # 6 + 5 + 0 = 11
    ("[MIN [MAX [SM 5 5 ] 3 ] 6 ]", 3),  # SM -> 0, MAX(0, 3) -> 3, MIN(3, 6) -> 3
]


def _reference_value(symbols: list[str]) -> int:
    """An independent recursive evaluator over the text symbols."""
    def parse(i: int) -> tuple[int, int]:
        if symbols[i].isdigit():
            return int(symbols[i]), i + 1
        op, args, i = symbols[i], [], i + 1
        while symbols[i] != "]":
            value, i = parse(i)
            args.append(value)
        ops = {"[MIN": min, "[MAX": max, "[SM": lambda a: sum(a) % 10,
               "[MED": lambda a: int(statistics.median(a))}
        return ops[op](args), i + 1

    value, end = parse(0)
    assert end == len(symbols)
    return value


@pytest.mark.parametrize("text,value", HAND_WORKED)
def test_listops_evaluator_on_hand_worked_expressions(text, value):
    ids = lra.listops_ids(text)
    assert lra.listops_text(ids) == text
    assert lra.evaluate_listops(ids) == value
    # CLS and padding around a row do not change the value
    row = np.concatenate([[lra.CLS_ID], ids, [lra.PAD_ID] * 5])
    assert lra.evaluate_listops(row) == value


@pytest.mark.parametrize("text", ["[MAX 1 2", "]", "1 2", "[MAX ]", "[SM 1 ] 3"])
def test_listops_evaluator_rejects_malformed_expressions(text):
    with pytest.raises(DataError):
        lra.evaluate_listops(lra.listops_ids(text))


def test_listops_ids_reject_unknown_symbols():
    with pytest.raises(DataError, match="unknown ListOps symbol"):
        lra.listops_ids("[MAX 1 [FIRST 2 ] ]")


def test_listops_rows_are_labeled_well_formed_and_padded():
    seq_len = 64
    task = lra.create("lra:listops", seq_len, lra.LISTOPS_VOCAB, 10)
    batch = task.train_batch(step=3, batch_size=16, seed=5)
    assert batch["inputs"].shape == (16, seq_len) and batch["targets"].shape == (16, 1)
    assert (batch["loss_weights"] == 1).all()
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < lra.LISTOPS_VOCAB
    for row, seg, pos, label in zip(batch["inputs"], batch["segment_ids"],
                                    batch["positions"], batch["targets"][:, 0], strict=True):
        n = int(seg.sum())
        assert row[0] == lra.CLS_ID and (seg[:n] == 1).all() and (row[n:] == lra.PAD_ID).all()
        assert (pos[:n] == np.arange(n)).all() and (pos[n:] == 0).all()
        assert (seq_len - 1) // 4 <= n - 1 <= seq_len - 1  # expression length in range
        symbols = lra.listops_text(row).split()
        assert symbols[0].startswith("[")  # an operator at the root, as in LRA
        assert label == _reference_value(symbols)


def test_training_batches_are_a_pure_function_of_seed_and_step():
    for source, seq_len, vocab, classes in [("lra:listops", 48, 17, 10),
                                            ("lra:image", 1025, 258, 10),
                                            ("lra:pathfinder", 1025, 258, 2)]:
        a = lra.create(source, seq_len, vocab, classes)
        b = lra.create(source, seq_len, vocab, classes)
        first, again = a.train_batch(7, 6, seed=1), b.train_batch(7, 6, seed=1)
        for key in first:
            np.testing.assert_array_equal(first[key], again[key], err_msg=f"{source} {key}")
        # one process's share is the same rows of the global batch
        share = a.train_batch(7, 6, seed=1, rows=range(3, 6))
        np.testing.assert_array_equal(share["inputs"], first["inputs"][3:])
        assert not np.array_equal(first["inputs"], a.train_batch(8, 6, seed=1)["inputs"])
        assert not np.array_equal(first["inputs"], a.train_batch(7, 6, seed=2)["inputs"])


def _key(row: np.ndarray, seg: np.ndarray) -> bytes:
    return row[1:int(seg.sum())].astype(np.int32).tobytes()


@pytest.mark.parametrize("source,seq_len,vocab,classes", [("lra:listops", 40, 17, 10),
                                                          ("lra:pathfinder", 1025, 258, 2)])
def test_generated_heldout_set_is_fixed_and_disjoint_from_training(source, seq_len, vocab,
                                                                   classes):
    task = lra.create(source, seq_len, vocab, classes)
    val = list(task.val_batches(8, 2))
    again = list(lra.create(source, seq_len, vocab, classes).val_batches(8, 2))
    np.testing.assert_array_equal(val[0]["inputs"], again[0]["inputs"])
    heldout = {_key(r, s) for v in val for r, s in zip(v["inputs"], v["segment_ids"],
                                                         strict=True)}
    assert len(heldout) == 16
    train = [task.train_batch(step, 8, seed) for step in range(4) for seed in (0, 1)]
    for batch in train:
        for row, seg in zip(batch["inputs"], batch["segment_ids"], strict=True):
            key = _key(row, seg)
            assert key not in heldout
            assert zlib.crc32(key) % 10 != 0  # the documented split rule
    for key in heldout:
        assert zlib.crc32(key) % 10 == 0


def _upscaled_digits() -> tuple[np.ndarray, np.ndarray]:
    """Independent of the source: each 8x8 level v -> round(255 v / 16) on a 4x4 block."""
    from sklearn.datasets import load_digits

    d = load_digits()
    grey = np.rint(d.images.astype(np.float64) * 255.0 / 16.0).astype(np.int64)
    big = np.stack([np.kron(g, np.ones((4, 4), np.int64)) for g in grey])
    return big.reshape(len(big), 1024), d.target


def test_image_rows_are_the_upscaled_digits_and_the_heldout_split_is_every_fifth():
    seq_len = 1056
    task = lra.create("lra:image", seq_len, lra.IMAGE_VOCAB, 10)
    pixels, labels = _upscaled_digits()
    index = {p.tobytes(): i for i, p in enumerate(pixels)}

    batch = task.train_batch(0, 12, seed=0)
    assert batch["inputs"].shape == (12, seq_len)
    assert (batch["inputs"][:, 0] == lra.CLS_ID).all()
    assert (batch["segment_ids"][:, :1025] == 1).all()
    assert (batch["segment_ids"][:, 1025:] == 0).all()
    assert (batch["inputs"][:, 1025:] == lra.PAD_ID).all()
    body = batch["inputs"][:, 1:1025] - 2
    assert body.min() >= 0 and body.max() <= 255 and batch["inputs"].max() < lra.IMAGE_VOCAB
    for row, label in zip(body, batch["targets"][:, 0], strict=True):
        i = index[row.astype(np.int64).tobytes()]
        assert i % 5 != 0 and labels[i] == label

    # eval: every held-out image once, in order; the padding rows of the last batch count 0
    val = list(task.val_batches(64))
    assert len(val) == 6  # 360 images
    weights = np.concatenate([v["loss_weights"][:, 0] for v in val])
    assert weights.sum() == 360 and (weights[360:] == 0).all()
    seen = np.concatenate([v["inputs"][:, 1:1025] - 2 for v in val])[:360]
    np.testing.assert_array_equal(seen, pixels[::5])
    np.testing.assert_array_equal(np.concatenate([v["targets"][:, 0] for v in val])[:360],
                                  labels[::5])
    counts = np.bincount(labels[::5])
    assert task.majority_baseline(64, None) == pytest.approx(counts.max() / 360)


def _stdlib_file_index() -> dict[bytes, str]:
    """Independent of the source: first bytes of every stdlib .py file -> its top package."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    index = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).parts
        if len(rel) > 1 and "site-packages" not in rel:
            index[path.read_bytes()[:255]] = rel[0]
    return index


def _row_bytes(row: np.ndarray, seg: np.ndarray) -> bytes:
    return bytes((row[1:int(seg.sum())] - 2).astype(np.uint8).tolist())


def test_text_rows_are_the_first_bytes_of_a_file_of_the_labeled_package():
    # 255 bytes: the shortest head that no held-out file shares with a training file (at
    # 127, an email file's copyright header matches another's)
    task = lra.create("lra:text", 256, lra.BYTE_VOCAB, lra.TEXT_CLASSES)
    names, _, _ = lra.package_bytes()
    index = _stdlib_file_index()
    batch = task.train_batch(3, 16, seed=0)
    assert batch["inputs"].shape == (16, 256) and (batch["inputs"][:, 0] == lra.CLS_ID).all()
    train_files = set()
    for row, seg, label in zip(batch["inputs"], batch["segment_ids"], batch["targets"][:, 0],
                               strict=True):
        head = _row_bytes(row, seg)
        assert len(head) == 255 and index[head] == names[label]
        train_files.add(head)
    val = list(task.val_batches(8))
    heads = [_row_bytes(r, s) for v in val for r, s, w in zip(
        v["inputs"], v["segment_ids"], v["loss_weights"][:, 0], strict=True) if w > 0]
    labels = [int(y) for v in val for y, w in zip(v["targets"][:, 0], v["loss_weights"][:, 0],
                                                   strict=True) if w > 0]
    assert all(index[h] == names[y] for h, y in zip(heads, labels, strict=True))
    assert not train_files & set(heads)  # held-out files are never trained on
    assert set(labels) == set(range(lra.TEXT_CLASSES))
    assert task.majority_baseline(8, None) == pytest.approx(
        np.bincount(labels).max() / len(labels))


def test_retrieval_rows_pair_two_files_labeled_by_same_package():
    seq_len = 256
    task = lra.create("lra:retrieval", seq_len, lra.BYTE_VOCAB, 2, two_tower=True)
    index = {h[:seq_len - 1]: p for h, p in _stdlib_file_index().items()}

    def pairs(batch):
        for row, seg, pos, label in zip(batch["inputs"], batch["segment_ids"],
                                        batch["positions"], batch["targets"][:, 0], strict=True):
            assert row.shape == (2 * seq_len,) and row[0] == row[seq_len] == lra.CLS_ID
            assert pos[seq_len] == 0 and pos[seq_len + 1] == 1  # each half from position 0
            a, b = (_row_bytes(row[i:i + seq_len], seg[i:i + seq_len]) for i in (0, seq_len))
            assert a != b and (index[a] == index[b]) == bool(label)
            yield a, b, int(label)

    train = [p for step in range(3) for p in pairs(task.train_batch(step, 16, seed=0))]
    held = [p for v in task.val_batches(16, 2) for p in pairs(v)]
    assert 0 < sum(y for *_, y in train) < len(train)
    train_files = {f for a, b, _ in train for f in (a, b)}
    assert not train_files & {f for a, b, _ in held for f in (a, b)}
    again = task.train_batch(1, 16, seed=0)
    np.testing.assert_array_equal(again["inputs"], task.train_batch(1, 16, seed=0)["inputs"])


def test_pathfinder_dots_mark_one_curve_or_two():
    curves = [np.array([[5, 5], [5, 6], [5, 7], [5, 8]]),
              np.array([[20, 20], [21, 20], [22, 20]]),
              np.array([[30, 1], [30, 2]]), np.array([[1, 30], [2, 30]])]
    for label, dots in [(1, [(5, 5), (5, 8)]), (0, [(5, 8), (22, 20)])]:
        image = lra._render(curves, label).reshape(32, 32) - 2
        full = np.argwhere(image == 255)
        expected = {(y + dy, x + dx) for y, x in dots for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
        assert {tuple(p) for p in full} == expected
    labels = [lra.random_pathfinder(np.random.default_rng([0, i]))[1] for i in range(40)]
    assert 0 < sum(labels) < 40


def test_pathfinder_labels_are_not_given_away_by_dot_distance_or_ink():
    """Only tracing the curve tells the labels apart: a classifier on the distance between the
    dots, the curve pixels and the dot pixels stays near chance. (Before the negatives' dots
    were placed a positive's gap apart and the dashes read the same from both ends, this
    test scored 84.7%: the dot distance alone gave the label away.)"""
    features, labels = [], []
    for i in range(1000):
        tokens, label = lra.random_pathfinder(np.random.default_rng([7, i]), False)
        image = tokens.reshape(32, 32) - 2
        dots = np.argwhere(image == 255)
        far = dots[((dots - dots[0]) ** 2).sum(1).argmax()]
        near_first = ((dots - dots[0]) ** 2).sum(1) <= ((dots - far) ** 2).sum(1)
        gap = np.linalg.norm(dots[near_first].mean(0) - dots[~near_first].mean(0))
        features.append([gap, (image == 160).sum(), len(dots)])
        labels.append(label)
    x, y = np.asarray(features), np.asarray(labels)
    model = HistGradientBoostingClassifier(max_iter=100, random_state=0).fit(x[:700], y[:700])
    accuracy = (model.predict(x[700:]) == y[700:]).mean()
    assert 0.4 < y.mean() < 0.6 and accuracy < 0.6, accuracy  # 300 images: 1 SE = 2.9 points


def test_too_small_vocabulary_wrong_classes_and_short_rows_are_one_line_errors():
    with pytest.raises(DataError, match=r"model.vocab_size must be >= 17, got 16") as e:
        lra.create("lra:listops", 64, 16, 10)
    assert "\n" not in str(e.value)
    with pytest.raises(DataError, match=r"model.vocab_size must be >= 258"):
        lra.create("lra:image", 1025, 257, 10)
    with pytest.raises(DataError, match=r"model.num_labels must be 2, got 10"):
        lra.create("lra:pathfinder", 1025, 258, 10)
    with pytest.raises(DataError, match=r"data.seq_len >= 1025"):
        lra.create("lra:image", 1024, 258, 10)
    with pytest.raises(DataError, match=r"unknown LRA task 'lra:audio'"):
        lra.create("lra:audio", 1024, 258, 10)
    with pytest.raises(DataError, match=r"needs model.two_tower=true"):
        lra.create("lra:retrieval", 128, 258, 2)
    with pytest.raises(DataError, match=r"set model.two_tower=false"):
        lra.create("lra:text", 128, 258, 4, two_tower=True)
    # the experiment file fails at config time, before anything is written
    cfg = config_lib.load_experiment(Path(__file__).parents[2] / "experiments/lra_listops.py")
    with pytest.raises(ConfigError, match=r"model.vocab_size must be >= 17"):
        config_lib.apply_overrides(cfg, ["model.vocab_size=12"])
    # a pair task needs the two-tower head, a single-sequence task refuses it
    experiments = Path(__file__).parents[2] / "experiments"
    retrieval = config_lib.load_experiment(experiments / "lra_retrieval.py")
    with pytest.raises(ConfigError, match=r"needs model.two_tower=true"):
        config_lib.apply_overrides(retrieval, ["model.two_tower=false"])
    with pytest.raises(ConfigError, match=r"two_tower=true \(pair classification\) needs"):
        config_lib.apply_overrides(retrieval, ["objective.kind=masked_lm"])
    text = config_lib.load_experiment(experiments / "lra_text.py")
    with pytest.raises(ConfigError, match=r"two_tower=true classifies pairs.*'lra:text' has "
                                          r"single sequences"):
        config_lib.apply_overrides(text, ["model.two_tower=true"])
    # a text objective on an LRA source says what to do
    with pytest.raises(DataError, match="objective.kind=classification"):
        DataPipeline.create("lra:listops", 64, 512, 0.1, 0, log=lambda s: None)
