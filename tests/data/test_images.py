"""Image sources (jaxformer.data.images): ``image:digits`` against scikit-learn's own digits,
the held-out split shared with ``lra:image``, batches as a pure function of (seed, step, row),
epochs that show every training image once, random shifts against an independent roll, and
the one-line errors for a model that does not fit the images."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from jaxformer.data import images, lra
from jaxformer.data.errors import DataError

SOURCE = "image:digits"


@pytest.fixture(scope="module")
def task() -> images.ImageSource:
    return images.create(SOURCE, 8, 1, 10)


def test_pixels_are_the_digits_scaled_to_unit_range_and_every_fifth_is_held_out(task):
    d = load_digits()
    held = np.arange(len(d.target)) % 5 == 0
    assert len(task.heldout_labels) == 360 and len(task.train_labels) == 1797 - 360
    np.testing.assert_array_equal(task.heldout_images[..., 0], d.images[held] / 16.0)
    np.testing.assert_array_equal(task.train_images[..., 0], d.images[~held] / 16.0)
    np.testing.assert_array_equal(task.heldout_labels, d.target[held])
    assert task.train_images.dtype == np.float32 and task.train_images.max() == 1.0
    # the split lra:image holds out: the same images, in the same order
    lra_task = lra.create("lra:image", 1025, lra.IMAGE_VOCAB, 10)
    np.testing.assert_array_equal(lra_task.heldout[1], task.heldout_labels)


def test_train_batches_are_a_pure_function_of_seed_and_step(task):
    a = task.train_batch(5, 8, seed=3)
    assert a["pixels"].shape == (8, 8, 8, 1) and a["pixels"].dtype == np.float32
    assert a["targets"].shape == (8, 1) and a["targets"].dtype == np.int32
    assert a["loss_weights"].shape == (8, 1) and (a["loss_weights"] == 1).all()
    b = images.create(SOURCE, 8, 1, 10).train_batch(5, 8, seed=3)  # a new source object
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # a process's share of rows is those rows of the whole batch
    share = task.train_batch(5, 8, seed=3, rows=range(4, 8))
    np.testing.assert_array_equal(share["pixels"], a["pixels"][4:])
    assert not np.array_equal(task.train_batch(6, 8, seed=3)["pixels"], a["pixels"])
    assert not np.array_equal(task.train_batch(5, 8, seed=4)["pixels"], a["pixels"])


def test_an_epoch_shows_every_training_image_once(task):
    n, batch = len(task.train_labels), 100
    seen = np.concatenate([task.train_batch(s, batch, seed=0)["pixels"]
                           for s in range(-(-n // batch))])[:n]
    as_bytes = sorted(x.tobytes() for x in seen)
    assert as_bytes == sorted(x.tobytes() for x in task.train_images)


def test_shifted_rows_are_the_images_moved_with_zeros_shifted_in():
    plain = images.create(SOURCE, 8, 1, 10)
    moved = images.create(SOURCE, 8, 1, 10, shift=2)
    a, b = plain.train_batch(7, 32, seed=1), moved.train_batch(7, 32, seed=1)
    np.testing.assert_array_equal(a["targets"], b["targets"])  # the same images, moved
    offsets = set()
    for x, y in zip(a["pixels"], b["pixels"], strict=True):
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if np.array_equal(y, _rolled(x, dy, dx))]
        assert matches, "a shifted row is no shift of its image"
        offsets.update(matches)
    assert len(offsets) > 5  # the offsets vary from row to row
    # held-out images are never moved
    for va, vb in zip(plain.val_batches(64), moved.val_batches(64), strict=True):
        np.testing.assert_array_equal(va["pixels"], vb["pixels"])


def _rolled(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """x moved by (dy, dx) with zeros shifted in, by np.roll and masking (independent of
    images.shift_image's slicing)."""
    out = np.roll(x, (dy, dx), axis=(0, 1))
    rows, cols = np.arange(8)[:, None], np.arange(8)[None, :]
    inside = (rows - dy >= 0) & (rows - dy < 8) & (cols - dx >= 0) & (cols - dx < 8)
    return np.where(inside[..., None], out, 0.0)


def test_val_batches_hold_every_heldout_image_once(task):
    batches = list(task.val_batches(64))
    assert len(batches) == 6
    weights = np.concatenate([b["loss_weights"][:, 0] for b in batches])
    assert weights.sum() == 360 and (weights[360:] == 0).all()
    pixels = np.concatenate([b["pixels"] for b in batches])[:360]
    np.testing.assert_array_equal(pixels, task.heldout_images)
    assert len(list(task.val_batches(64, 2))) == 2
    assert task.majority_baseline(64, None) == pytest.approx(
        np.bincount(task.heldout_labels).max() / 360)


@pytest.mark.parametrize("args,needle", [
    ((SOURCE, 16, 1, 10), "set model.image_size=8 and model.image_channels=1"),
    ((SOURCE, 8, 3, 10), "set model.image_size=8 and model.image_channels=1"),
    ((SOURCE, 8, 1, 2), "model.num_labels must be 10"),
    (("image:mnist", 28, 1, 10), "unknown image data source 'image:mnist'"),
])
def test_a_model_that_does_not_fit_is_a_one_line_error(args, needle):
    with pytest.raises(DataError) as info:
        images.create(*args)
    assert needle in str(info.value) and "\n" not in str(info.value)
