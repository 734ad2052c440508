"""Image classification sources for Vision Transformers (``model.patch_size > 0``):
``data.source = "image:<name>"``, offline and deterministic.

``image:digits``: scikit-learn's bundled 8x8 handwritten digits (``jaxformer.data.digits``),
one grey channel, grey level v as the pixel value v / 16 in [0, 1], 10 classes; the images
whose index is 0 mod 5 are held out (360 of 1,797: the split of ``lra:image``).

Batches (letters: B batch, H/W image side, C channels):

    pixels        [B, H, W, C] float32
    targets       [B, 1] int32     (the label; the classification objective's layout)
    loss_weights  [B, 1] float32   (0 on the rows that only fill the last held-out batch)

Training rows are a pure function of (seed, step, row): the training images are walked in
epochs, epoch e in the order ``default_rng([seed, e]).permutation``, and row b of step s is
example s * B + b of that walk; so every image is seen once per epoch, and a resumed run reads
what the uninterrupted one would have. With ``shift`` k > 0 (``data.image_shift``), each
training row is moved by offsets (dy, dx) drawn uniformly from -k..k by
``default_rng([seed, step, b])``, pixels moved out of view dropped and zeros moved in (light
augmentation: a digit moved by a pixel is the same digit).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator

import numpy as np

from jaxformer.data import digits
from jaxformer.data.errors import DataError
from jaxformer.data.manifest import Manifest, bundled_manifest

PREFIX = "image:"
# name -> (image side, channels, classes)
DATASETS = {"digits": (digits.SIDE, 1, 10)}

Batch = dict[str, np.ndarray]


def is_image(source: str) -> bool:
    return source.startswith(PREFIX)


def dataset_shape(source: str) -> tuple[int, int, int]:
    """-> (image side, channels, classes) of ``image:<name>``; a DataError for another name."""
    name = source[len(PREFIX):]
    if not is_image(source) or name not in DATASETS:
        raise DataError(f"unknown image data source {source!r}; choose one of: "
                        f"{', '.join(PREFIX + n for n in DATASETS)}")
    return DATASETS[name]


def check(source: str, image_size: int, image_channels: int, num_labels: int) -> None:
    """A one-line DataError when the model's image shape or classes do not fit ``source``."""
    side, channels, classes = dataset_shape(source)
    if (image_size, image_channels) != (side, channels):
        raise DataError(f"data.source={source!r} holds {side}x{side} images of {channels} "
                        f"channel(s): set model.image_size={side} and "
                        f"model.image_channels={channels} (got {image_size} and "
                        f"{image_channels})")
    if num_labels != classes:
        raise DataError(f"data.source={source!r} has {classes} classes; model.num_labels must "
                        f"be {classes}, got {num_labels}")


def _example(image: np.ndarray, label: int, weight: float = 1.0) -> Batch:
    return {"pixels": image, "targets": np.asarray([label], np.int32),
            "loss_weights": np.asarray([weight], np.float32)}


def _stack(rows: list[Batch]) -> Batch:
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@dataclasses.dataclass
class ImageSource:
    """One image task: training rows per (seed, step), a fixed held-out set."""

    source: str
    train_images: np.ndarray  # [n, H, W, C] float32
    train_labels: np.ndarray  # [n] int32
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    num_classes: int
    manifest: Manifest
    shift: int = 0  # the largest random offset of a training image, in pixels (0: none)

    def train_batch(self, step: int, batch_size: int, seed: int,
                    rows: range | None = None) -> Batch:
        """The rows ``rows`` (default: all) of training batch ``step`` (module docstring)."""
        n = len(self.train_labels)
        out = []
        for b in range(batch_size) if rows is None else rows:
            epoch, k = divmod(step * batch_size + b, n)
            i = int(_epoch_order(seed, epoch, n)[k])
            image = self.train_images[i]
            if self.shift:
                dy, dx = np.random.default_rng([seed, step, b]).integers(
                    -self.shift, self.shift + 1, 2)
                image = shift_image(image, int(dy), int(dx))
            out.append(_example(image, int(self.train_labels[i])))
        return _stack(out)

    def n_val_batches(self, batch_size: int, n_batches: int | None) -> int:
        """``n_batches`` (None or 0: all), at most the batches the held-out set fills."""
        whole = -(-len(self.heldout_labels) // batch_size)
        return min(n_batches or whole, whole)

    def val_batches(self, batch_size: int, n_batches: int | None = None) -> Iterator[Batch]:
        """Held-out images in order, in batches of exactly ``batch_size``; the last batch is
        completed with rows of loss weight 0 (they count in no metric)."""
        for i in range(self.n_val_batches(batch_size, n_batches)):
            rows = [_example(x, int(y)) for x, y in zip(
                self.heldout_images[i * batch_size:][:batch_size],
                self.heldout_labels[i * batch_size:][:batch_size], strict=True)]
            filler = _example(self.heldout_images[0], int(self.heldout_labels[0]), weight=0.0)
            yield _stack(rows + [filler] * (batch_size - len(rows)))

    def majority_baseline(self, batch_size: int, n_batches: int | None) -> float:
        """Accuracy of always answering the most frequent label of these validation batches."""
        k = self.n_val_batches(batch_size, n_batches)
        labels = self.heldout_labels[:k * batch_size]
        return float(np.bincount(labels).max() / len(labels))


def shift_image(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """image [H, W, C] moved down by dy and right by dx pixels (negative: up, left): pixel
    (y, x) of the result is pixel (y - dy, x - dx) of ``image``, 0 where that is outside."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order [n] of the training images in epoch ``epoch``."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def create(source: str, image_size: int, image_channels: int, num_labels: int,
           shift: int = 0) -> ImageSource:
    """The task ``source`` names, checked against the model (``check``); ``shift``: the
    training images' largest random offset (module docstring)."""
    check(source, image_size, image_channels, num_labels)
    levels, labels = digits.load_digits(source)  # the only dataset so far
    pixels = (levels.astype(np.float32) / digits.LEVELS)[..., None]  # [n, 8, 8, 1] in [0, 1]
    held = digits.heldout_mask(len(labels))
    digest = hashlib.sha256(levels.tobytes() + labels.tobytes()).hexdigest()
    return ImageSource(source=source, train_images=pixels[~held], train_labels=labels[~held],
                       heldout_images=pixels[held], heldout_labels=labels[held],
                       num_classes=DATASETS["digits"][2],
                       manifest=bundled_manifest(source, digest), shift=shift)


def batch_shapes(batch_size: int, image_size: int, image_channels: int
                 ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """name -> (shape, dtype) of an image batch's arrays (module docstring), for abstract
    batches (ahead-of-time compilation) and synthetic ones (benchmarks)."""
    return {"pixels": ((batch_size, image_size, image_size, image_channels),
                       np.dtype(np.float32)),
            "targets": ((batch_size, 1), np.dtype(np.int32)),
            "loss_weights": ((batch_size, 1), np.dtype(np.float32))}
