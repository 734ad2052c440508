"""Synthetic translation tasks with separate source and target vocabularies, generated on the
fly as a pure function of (seed, step): no download, unlimited data, an exact answer.

``data.source = "synthetic:reverse"``: the target is the source reversed, each symbol mapped
to its counterpart in the target alphabet (so the model must learn both the reordering and
the vocabulary map). ``"synthetic:sort"``: the target is the sorted source, mapped likewise.

Ids: 0 EOS, 1 PAD (also the decoder start token), 2.. the source alphabet, then the target
alphabet. Held-out examples are those whose source hashes to 0 mod 10; training examples are
drawn from the other 90%, so validation never contains a training sentence.

Letters: B batch, S source length, T target length (both data.seq_len).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator

import numpy as np

from jaxformer.data.errors import DataError
from jaxformer.data.packing import stack_examples

EOS_ID, PAD_ID = 0, 1
ALPHABET = 24  # symbols per language
MIN_LEN, MAX_LEN = 4, 16
TASKS = ("reverse", "sort")
PREFIX = "synthetic:"


def is_synthetic(source: str) -> bool:
    return source.startswith(PREFIX)


def vocab_size() -> int:
    return 2 + 2 * ALPHABET


def _is_heldout(src: np.ndarray) -> bool:
    return zlib.crc32(src.astype(np.int32).tobytes()) % 10 == 0


@dataclasses.dataclass(frozen=True)
class SyntheticTranslation:
    """Source/target pairs of one task, padded to ``seq_len`` on both sides."""

    task: str
    seq_len: int

    @classmethod
    def create(cls, source: str, seq_len: int) -> SyntheticTranslation:
        task = source[len(PREFIX):]
        if task not in TASKS:
            raise DataError(f"unknown synthetic task {task!r}; choose one of: "
                            f"{', '.join(PREFIX + t for t in TASKS)}")
        if seq_len < MAX_LEN + 1:
            raise DataError(f"synthetic translation needs data.seq_len >= {MAX_LEN + 1} (sources "
                            f"up to {MAX_LEN} symbols + EOS), got {seq_len}")
        return cls(task, seq_len)

    def source_ids(self, symbols: np.ndarray) -> np.ndarray:
        return 2 + symbols

    def target_ids(self, symbols: np.ndarray) -> np.ndarray:
        return 2 + ALPHABET + symbols

    def translate(self, src_symbols: np.ndarray) -> np.ndarray:
        """The reference target symbols of a source."""
        return src_symbols[::-1] if self.task == "reverse" else np.sort(src_symbols)

    def sample(self, rng: np.random.Generator, heldout: bool) -> np.ndarray:
        """Source symbols [n] from the training (or held-out) part of the task."""
        while True:
            n = int(rng.integers(MIN_LEN, MAX_LEN + 1))
            src = rng.integers(0, ALPHABET, n)
            if _is_heldout(src) == heldout:
                return src

    def example(self, src: np.ndarray) -> dict[str, np.ndarray]:
        """One padded pair: enc_* [S], decoder inputs/targets/loss_weights/... [T]."""
        t = self.seq_len
        enc = np.append(self.source_ids(src), EOS_ID)
        tgt = np.append(self.target_ids(self.translate(src)), EOS_ID)
        dec_in = np.concatenate([[PAD_ID], tgt[:-1]])

        def pad(x: np.ndarray, value: int) -> np.ndarray:
            return np.concatenate([x, np.full(t - len(x), value)]).astype(np.int32)

        real_enc = np.arange(t) < len(enc)
        real_dec = np.arange(t) < len(tgt)
        return {"enc_inputs": pad(enc, PAD_ID), "enc_segment_ids": real_enc.astype(np.int32),
                "enc_positions": np.where(real_enc, np.arange(t), 0).astype(np.int32),
                "inputs": pad(dec_in, PAD_ID), "targets": pad(tgt, PAD_ID),
                "loss_weights": real_dec.astype(np.float32),
                "segment_ids": real_dec.astype(np.int32),
                "positions": np.where(real_dec, np.arange(t), 0).astype(np.int32)}

    def train_batch(self, step: int, batch_size: int, seed: int,
                    rows: range | None = None) -> dict[str, np.ndarray]:
        """Row b of step s comes from default_rng([seed, s, b]): a pure function of the step.
        ``rows``: only these rows of the batch (one process's share)."""
        rows = [self.example(self.sample(np.random.default_rng([seed, step, b]), False))
                for b in (range(batch_size) if rows is None else rows)]
        return stack_examples(rows)

    def heldout_sources(self, n: int, seed: int = 0) -> list[np.ndarray]:
        rng = np.random.default_rng([seed, 2**31 - 1])
        return [self.sample(rng, True) for _ in range(n)]

    def val_batches(self, batch_size: int, n_batches: int) -> Iterator[dict[str, np.ndarray]]:
        sources = self.heldout_sources(batch_size * n_batches)
        for k in range(n_batches):
            chunk = sources[k * batch_size:(k + 1) * batch_size]
            yield stack_examples([self.example(s) for s in chunk])


@dataclasses.dataclass
class _Encoding:
    ids: list[int]


class SymbolTokenizer:
    """Text <-> ids of the synthetic tasks, for tools that take text (attention maps): the
    text is source symbols as space-separated numbers in [0, ALPHABET), e.g. ``"3 1 4 1 5"``;
    ids print as ``s3`` (source), ``t3`` (target), ``EOS``, ``PAD``. The special-token names
    are the text pipeline's, so code written for a trained tokenizer works unchanged."""

    def __init__(self, eos: str, pad: str):
        self.specials = {eos: EOS_ID, pad: PAD_ID}

    def encode(self, text: str) -> _Encoding:
        try:
            symbols = [int(s) for s in text.split()]
        except ValueError:
            raise DataError(f"synthetic-task text is space-separated symbol numbers in [0, "
                            f"{ALPHABET}), got {text!r}") from None
        if any(not 0 <= s < ALPHABET for s in symbols):
            raise DataError(f"synthetic-task symbols must be in [0, {ALPHABET}), got {text!r}")
        return _Encoding([2 + s for s in symbols])

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        names = {EOS_ID: "EOS", PAD_ID: "PAD"}
        return " ".join(names.get(i) or (f"s{i - 2}" if i < 2 + ALPHABET else
                                         f"t{i - 2 - ALPHABET}") for i in ids)

    def token_to_id(self, token: str) -> int | None:
        return self.specials.get(token)
