"""Image captioning, offline and deterministic (``data.source = "caption:digits"``): a
generated image of two or three handwritten digits side by side, described in words, as
``"three then seven"``, for an image-prefix decoder (``model.arch = "image_prefix"``).

An image (``compose``): a 24x24 grey canvas (zeros) holding ``k`` in {2, 3} of scikit-learn's
bundled 8x8 digits (``jaxformer.data.digits``, pixel value v / 16), left to right in
non-overlapping 8-pixel columns, each at its own height (top row 0..16). With three digits the
columns are 0, 8 and 16; with two, the left edges are drawn from 0..16 at least 8 apart. The
caption names the digits from left to right: the words of ``WORDS`` joined by ``"then"``.

The split is the digits' own (``digits.heldout_mask``, index 0 mod 5): training images compose
training digits only, held-out images held-out digits only, so no held-out image shares a
digit drawing with training. Training row b of step s draws from ``default_rng([seed, s, b])``,
held-out image k from ``default_rng([2**31 - 1, k])``: pure functions, so resuming and any
share of the batch read the same rows.

Captions use a word vocabulary (``VOCAB``): ids 0 PAD, 1 BOS, 2 EOS, then "zero" .. "nine",
"then". A batch (letters: B batch, S image side, L ``data.seq_len``):

    pixels        [B, S, S, 1] float32
    inputs        [B, L] int32   BOS, then the caption's words, PAD after
    targets       [B, L] int32   the words, then EOS, PAD after
    loss_weights  [B, L] float32 1 on the real targets
    segment_ids   [B, L] int32   1 on the real tokens
    positions     [B, L] int32   0, 1, 2, ...
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np

from jaxformer.data import digits
from jaxformer.data.errors import DataError
from jaxformer.data.manifest import Manifest, bundled_manifest
from jaxformer.data.packing import decoder_rows

PREFIX = "caption:"
SOURCES = ("digits",)
SIDE = 24  # the canvas
GRID = 4  # digits sit on a 4-pixel grid (the experiment's patches: each digit is 2x2 of them)
CHANNELS = 1
MIN_DIGITS, MAX_DIGITS = 2, 3
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THEN = "then"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB = ("<pad>", "<bos>", "<eos>", *WORDS, THEN)
VOCAB_SIZE = len(VOCAB)
_WORD_IDS = {w: i for i, w in enumerate(VOCAB)}
HELDOUT_IMAGES = 256  # what eval.batches=0 reads
_VAL_KEY = 2**31 - 1
Batch = dict[str, np.ndarray]


def is_caption(source: str) -> bool:
    return source.startswith(PREFIX)


def check_source(source: str) -> None:
    if source[len(PREFIX):] not in SOURCES or not is_caption(source):
        raise DataError(f"unknown caption source {source!r}; choose one of "
                        f"{', '.join(PREFIX + s for s in SOURCES)}")


def max_caption_tokens() -> int:
    """Decoder positions the longest caption takes: its words + EOS (or BOS + its words)."""
    return 2 * MAX_DIGITS - 1 + 1


def caption(labels: Sequence[int]) -> str:
    """Digit labels, left to right -> ``"three then seven"``."""
    return f" {THEN} ".join(WORDS[int(d)] for d in labels)


def encode_caption(text: str) -> list[int]:
    """A caption -> word ids (no BOS or EOS); a DataError for a word outside ``VOCAB``."""
    try:
        return [_WORD_IDS[w] for w in text.split()]
    except KeyError as e:
        raise DataError(f"word {e.args[0]!r} is not in the caption vocabulary") from None


def decode_caption(ids: Sequence[int]) -> str:
    """Word ids -> text: PAD and BOS skipped, everything from the first EOS on dropped."""
    words = []
    for i in (int(i) for i in ids):
        if i == EOS_ID:
            break
        if i not in (PAD_ID, BOS_ID):
            words.append(VOCAB[i] if 0 <= i < VOCAB_SIZE else "<unk>")
    return " ".join(words)


def compose(images: Sequence[np.ndarray], lefts: Sequence[int], tops: Sequence[int]
            ) -> np.ndarray:
    """8x8 digit images (grey levels 0..16) at (top, left) corners -> a canvas [S, S, 1]
    float32 of pixel values v / 16."""
    canvas = np.zeros((SIDE, SIDE, CHANNELS), np.float32)
    for image, left, top in zip(images, lefts, tops, strict=True):
        canvas[top:top + digits.SIDE, left:left + digits.SIDE, 0] = image / digits.LEVELS
    return canvas


def _lefts(rng: np.random.Generator, k: int) -> list[int]:
    """Left edges of k non-overlapping 8-pixel columns in the 24-pixel canvas."""
    span = (SIDE - k * digits.SIDE) // GRID  # free grid steps to share out as gaps
    cuts = np.sort(rng.integers(0, span + 1, size=k))  # each digit's shift from packed left
    return [int(i * digits.SIDE + GRID * c) for i, c in enumerate(cuts)]


@functools.cache
def _pools(source: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (training images, labels, held-out images, labels) of the bundled digits."""
    images, labels = digits.load_digits(source)
    held = digits.heldout_mask(len(labels))
    return images[~held], labels[~held], images[held], labels[held]


def example(source: str, rng: np.random.Generator, heldout: bool) -> tuple[np.ndarray, str]:
    """One (image [S, S, 1] float32, caption) from the requested side of the split."""
    train_x, train_y, held_x, held_y = _pools(source)
    pool_x, pool_y = (held_x, held_y) if heldout else (train_x, train_y)
    k = int(rng.integers(MIN_DIGITS, MAX_DIGITS + 1))
    pick = rng.integers(len(pool_y), size=k)
    tops = GRID * rng.integers(0, (SIDE - digits.SIDE) // GRID + 1, size=k)
    image = compose(pool_x[pick], _lefts(rng, k), tops)
    return image, caption(pool_y[pick])


def caption_rows(texts: Sequence[str], seq_len: int) -> Batch:
    """Captions -> the text half of a batch ([B, L] each, module docstring)."""
    return decoder_rows([encode_caption(t) for t in texts], seq_len, pad=PAD_ID, bos=BOS_ID,
                        eos=EOS_ID, texts=list(texts))


@dataclasses.dataclass(frozen=True)
class CaptionTask:
    """One caption source at one decoder length."""

    source: str
    seq_len: int

    @classmethod
    def create(cls, source: str, seq_len: int) -> CaptionTask:
        check_source(source)
        if seq_len < max_caption_tokens():
            raise DataError(f"{source} captions run to {max_caption_tokens() - 1} words + EOS = "
                            f"{max_caption_tokens()} decoder tokens, more than data.seq_len="
                            f"{seq_len}; set data.seq_len >= {max_caption_tokens()}")
        return cls(source, seq_len)

    def batch(self, examples: Sequence[tuple[np.ndarray, str]]) -> Batch:
        return {"pixels": np.stack([x for x, _ in examples]),
                **caption_rows([t for _, t in examples], self.seq_len)}

    def train_batch(self, step: int, batch_size: int, seed: int, rows: range) -> Batch:
        """Rows ``rows`` of the global batch of ``step`` (one process's share)."""
        del batch_size  # a row depends on (seed, step, row) alone
        return self.batch([example(self.source, np.random.default_rng([seed, step, r]), False)
                           for r in rows])

    def heldout(self, k: int) -> tuple[np.ndarray, str]:
        """Held-out image ``k`` [S, S, 1] and its caption: the same for every seed and run."""
        return example(self.source, np.random.default_rng([_VAL_KEY, k]), True)

    def val_batches(self, batch_size: int, n_batches: int | None) -> Iterator[Batch]:
        """``n_batches`` batches of held-out images (None or 0: ``HELDOUT_IMAGES`` of them)."""
        n = n_batches or max(1, HELDOUT_IMAGES // batch_size)
        for i in range(n):
            yield self.batch([self.heldout(k)
                              for k in range(i * batch_size, (i + 1) * batch_size)])

    def manifest(self) -> Manifest:
        """The bundled digits' digest: a resumed run tells when they changed."""
        images, labels = digits.load_digits(self.source)
        digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
        return bundled_manifest(self.source, digest)
