"""Speech sources (``data.source='speech:<name>'``) as step-indexed seq2seq batches: clips and
their transcripts (``jaxformer.data.speech``) in the encoder-decoder layout of the ``seq2seq``
objective, with audio in place of the encoder's tokens.

A batch (letters: B batch, N samples = ``clip_seconds * sample_rate``, T = N // 160
spectrogram frames, L = ``data.seq_len`` decoder length):

    audio          [B, N] float32  the waves, zero after each clip's end
    audio_mask     [B, T] int32    1 on each clip's spectrogram frames (t < length // 160)
    inputs         [B, L] int32    BOS, then the transcript's characters, PAD after
    targets        [B, L] int32    the characters, then EOS, PAD after
    loss_weights   [B, L] float32  1 on the real targets
    segment_ids    [B, L] int32    1 on the real decoder tokens
    positions      [B, L] int32    0, 1, 2, ...

Training row b of step s is ``speech.train_example(seed, s, b)``: a pure function of (seed,
step, row), so a resumed run and any process share of the batch see the same clips. The
held-out set is the first ``HELDOUT_CLIPS`` held-out clips (the fixed CRC-32 split).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator

import numpy as np

from jaxformer.config import AUDIO_HOP
from jaxformer.data import dtmf, speech
from jaxformer.data.errors import DataError
from jaxformer.data.packing import decoder_rows

PREFIX = "speech:"
SOURCES = ("morse", "dtmf")
HELDOUT_CLIPS = 256  # what eval.batches=0 reads
Batch = dict[str, np.ndarray]


def is_speech(source: str) -> bool:
    return source.startswith(PREFIX)


def spec_for(source: str, sample_rate: int, clip_seconds: float) -> speech.ClipSpec:
    """The clip distribution ``source`` names, at the data's rate and longest clip."""
    name = source[len(PREFIX):]
    if name not in SOURCES:
        raise DataError(f"unknown speech source {source!r}; choose one of "
                        f"{', '.join(PREFIX + s for s in SOURCES)}")
    if name == "dtmf":
        return dtmf.DtmfSpec(sample_rate=sample_rate, max_seconds=clip_seconds)
    return speech.MorseSpec(sample_rate=sample_rate, max_seconds=clip_seconds)


def decoder_length(spec: speech.ClipSpec) -> int:
    """Decoder positions the longest transcript takes: its characters + EOS (or BOS)."""
    return spec.max_chars + 1


def check(source: str, sample_rate: int, clip_seconds: float, seq_len: int) -> None:
    """A one-line DataError for a source that is not one, or transcripts longer than the
    decoder's ``data.seq_len``."""
    spec = spec_for(source, sample_rate, clip_seconds)
    need = decoder_length(spec)
    if seq_len < need:
        raise DataError(f"{source} transcripts run to {spec.max_chars} characters + EOS = "
                        f"{need} decoder tokens, more than data.seq_len={seq_len}; set "
                        f"data.seq_len >= {need}")


def transcript_rows(texts: list[str], seq_len: int) -> Batch:
    """Transcripts -> the decoder half of a batch ([B, L] each, module docstring)."""
    return decoder_rows([speech.encode_text(t) for t in texts], seq_len, pad=speech.PAD_ID,
                        bos=speech.BOS_ID, eos=speech.EOS_ID, texts=list(texts))


def to_batch(clips: speech.SpeechBatch, seq_len: int) -> Batch:
    """A padded SpeechBatch -> the seq2seq batch of the module docstring."""
    n = clips.waves.shape[1]
    t = n // AUDIO_HOP
    mask = (np.arange(t)[None, :] < (clips.lengths // AUDIO_HOP)[:, None]).astype(np.int32)
    return {"audio": clips.waves, "audio_mask": mask, **transcript_rows(clips.texts, seq_len)}


@dataclasses.dataclass(frozen=True)
class SpeechTask:
    """One speech source at one clip length and decoder length."""

    source: str
    spec: speech.ClipSpec
    seq_len: int

    @classmethod
    def create(cls, source: str, sample_rate: int, clip_seconds: float,
               seq_len: int) -> SpeechTask:
        check(source, sample_rate, clip_seconds, seq_len)
        return cls(source, spec_for(source, sample_rate, clip_seconds), seq_len)

    def train_batch(self, step: int, batch_size: int, seed: int, rows: range) -> Batch:
        """Rows ``rows`` of the global batch of ``step`` (one process's share)."""
        del batch_size  # a row depends on (seed, step, row) alone
        examples = [speech.train_example(seed, step, r, self.spec) for r in rows]
        return to_batch(speech.pad_batch(examples, self.spec.max_samples), self.seq_len)

    def heldout(self, k: int) -> tuple[np.ndarray, str]:
        """Held-out clip ``k`` [n] float32 and its transcript."""
        return _heldout(self.spec, k)

    def val_batches(self, batch_size: int, n_batches: int | None) -> Iterator[Batch]:
        """``n_batches`` batches of held-out clips (None or 0: ``HELDOUT_CLIPS`` of them)."""
        n = n_batches or max(1, HELDOUT_CLIPS // batch_size)
        for i in range(n):
            examples = [self.heldout(k) for k in range(i * batch_size, (i + 1) * batch_size)]
            yield to_batch(speech.pad_batch(examples, self.spec.max_samples), self.seq_len)


@functools.lru_cache(maxsize=4096)
def _heldout(spec: speech.ClipSpec, k: int) -> tuple[np.ndarray, str]:
    # Rendered once per process: every evaluation reads the same clips.
    return speech.heldout_example(k, spec)


class CharTokenizer:
    """The transcripts' character vocabulary behind the tokenizer methods a run's generator
    calls (``decode``, ``encode``, ``token_to_id``)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        del skip_special_tokens
        return speech.decode_text(ids)

    def encode(self, text: str) -> np.ndarray:
        return speech.encode_text(text)

    def token_to_id(self, token: str) -> int | None:
        ids = {"<pad>": speech.PAD_ID, "<bos>": speech.BOS_ID, "<eos>": speech.EOS_ID}
        if token in ids:
            return ids[token]
        return int(speech.encode_text(token)[0]) if len(token) == 1 and token in speech.CHARS \
            else None
