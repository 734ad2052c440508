"""Synthesized speech-like audio, offline and deterministic: short random texts keyed as Morse
code tones at 16 kHz, for a Whisper-style encoder-decoder to transcribe (label = the text).

Morse code as Recommendation ITU-R M.1677-1 (10/2009), "International Morse code", defines it:
letters a-z and digits 0-9 as dots and dashes (``MORSE``); a dash is three dots long; the gap
between the elements of one character is one dot, between characters three dots, between words
seven dots. Speed in words per minute uses the standard word PARIS (50 dot units with its word
gap), so one dot lasts 1.2 / wpm seconds (60 ms at 20 WPM, 30 ms at 40 WPM).

One example (``random_example``):

- text: ``min_chars`` to ``max_chars`` characters (length uniform), each uniform over a-z0-9,
  except that an inner position is a space with probability ``space_p`` when the one before it
  is not (no leading, trailing or double spaces: Morse cannot tell them apart).
- style, drawn uniformly per example within the ``MorseSpec`` ranges: tone frequency,
  amplitude, leading and trailing silence, the SNR of the background noise and the speed in
  WPM (speed variation between examples), the speed from the part of its range at which the
  clip fits in ``max_seconds`` (a text too long even at the fastest speed is redrawn).
- audio: ``amplitude * envelope(t) * sin(2 pi tone_hz t + phase)``, the key envelope 1 while
  an element sounds (edges at sample ``round(sample_rate * time)``), its edges smoothed into
  4 ms raised-cosine ramps centred on them (real transmitters shape the keying to avoid key
  clicks; the envelope crosses 1/2 on the ITU timing);
  plus white Gaussian noise of standard deviation ``amplitude / sqrt(2) / 10 ** (snr_db / 20)``
  (the SNR of the sounding tone's power, amplitude^2 / 2, against the noise). float32, not
  clipped.

With the defaults (``MorseSpec``: 3 to 6 characters, 20 to 40 WPM, 10 to 30 dB, clips of at
most 3 s) a clip lasts 2.3 s on average: at most 300 frames of Whisper's log-Mel front end
(``jaxformer.nn.spectrogram``), 150 after its stride-2 convolution.

Split and determinism (as ``jaxformer.data.lra``): a text is held out when the CRC-32 of its
ASCII bytes is 0 mod 10; a draw redraws its text until it lands on the requested side, so the
held-out set never shares a text with training. Training row b of step s draws from
``default_rng([seed, s, b])``, held-out example k from ``default_rng([2**31 - 1, k])``.

Transcripts use a character vocabulary: ids 0 PAD, 1 BOS, 2 EOS, then ``CHARS`` from id 3.

Letters: B batch, S samples (``MorseSpec.max_samples``).
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from jaxformer.data.errors import DataError

CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 "
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
CHAR_BASE = 3  # id of CHARS[0]
VOCAB_SIZE = CHAR_BASE + len(CHARS)
_CHAR_IDS = {c: CHAR_BASE + i for i, c in enumerate(CHARS)}
_VAL_KEY = 2**31 - 1  # the held-out stream's generator key, far from any (seed, step)

# ITU-R M.1677-1, part I, 1.1.1 (letters) and 1.1.3 (figures).
MORSE = {
    "a": ".-", "b": "-...", "c": "-.-.", "d": "-..", "e": ".", "f": "..-.", "g": "--.",
    "h": "....", "i": "..", "j": ".---", "k": "-.-", "l": ".-..", "m": "--", "n": "-.",
    "o": "---", "p": ".--.", "q": "--.-", "r": ".-.", "s": "...", "t": "-", "u": "..-",
    "v": "...-", "w": ".--", "x": "-..-", "y": "-.--", "z": "--..",
    "0": "-----", "1": ".----", "2": "..---", "3": "...--", "4": "....-",
    "5": ".....", "6": "-....", "7": "--...", "8": "---..", "9": "----.",
}
DOT_SECONDS_AT_1_WPM = 1.2  # PARIS: 50 units a word, so a unit is 60 / (50 wpm) s
DASH_UNITS, ELEMENT_GAP, CHAR_GAP, WORD_GAP = 3, 1, 3, 7  # in dots (ITU-R M.1677-1, part I, 2)
RAMP_SECONDS = 0.004  # raised-cosine key edges, centred on the ITU edges (at most half a dot)


@dataclasses.dataclass(frozen=True)
class MorseSpec:
    """What ``random_example`` draws from; (lo, hi) ranges are drawn uniformly per example."""

    sample_rate: int = 16000
    min_chars: int = 3
    max_chars: int = 6
    space_p: float = 0.15  # an inner space's probability (after a non-space)
    wpm: tuple[float, float] = (20.0, 40.0)
    tone_hz: tuple[float, float] = (400.0, 1000.0)
    amplitude: tuple[float, float] = (0.1, 0.9)
    snr_db: tuple[float, float] = (10.0, 30.0)
    margin_seconds: tuple[float, float] = (0.05, 0.25)  # silence before and after, each
    max_seconds: float = 3.0  # every clip fits in max_samples (batches pad to it)

    def __post_init__(self) -> None:
        for name in ("wpm", "tone_hz", "amplitude", "snr_db", "margin_seconds"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise DataError(f"MorseSpec.{name} = ({lo}, {hi}): need lo <= hi")
        if not (self.sample_rate > 0 and self.wpm[0] > 0 and self.amplitude[0] > 0
                and self.tone_hz[0] > 0 and self.margin_seconds[0] >= 0):
            raise DataError("MorseSpec: sample_rate, wpm, amplitude and tone_hz must be "
                            "positive, margin_seconds not negative")
        if self.tone_hz[1] >= self.sample_rate / 2:
            raise DataError(f"MorseSpec.tone_hz up to {self.tone_hz[1]} Hz: must stay below "
                            f"the Nyquist frequency {self.sample_rate / 2} Hz")
        if not 1 <= self.min_chars <= self.max_chars or not 0 <= self.space_p < 1:
            raise DataError("MorseSpec: need 1 <= min_chars <= max_chars and 0 <= space_p < 1")
        shortest = clip_seconds("e" * self.min_chars, self.wpm[1], *[self.margin_seconds[1]] * 2)
        if shortest > self.max_seconds:
            raise DataError(f"MorseSpec.max_seconds = {self.max_seconds}: even "
                            f"{'e' * self.min_chars!r} at {self.wpm[1]} WPM lasts {shortest:.2f} s")

    @property
    def max_samples(self) -> int:
        return int(round(self.max_seconds * self.sample_rate))

    def draw(self, rng: np.random.Generator, heldout: bool) -> tuple[np.ndarray, str]:
        return random_example(rng, heldout, self)


class ClipSpec(Protocol):
    """What a speech source's spec gives (``MorseSpec``, ``dtmf.DtmfSpec``): clips of at most
    ``max_samples`` at ``sample_rate`` with transcripts of at most ``max_chars``."""

    sample_rate: int

    @property
    def max_samples(self) -> int: ...

    @property
    def max_chars(self) -> int: ...

    def draw(self, rng: np.random.Generator, heldout: bool) -> tuple[np.ndarray, str]:
        """One (clip [N] float32, text) on the requested side of the held-out split."""
        ...


# --- text and its vocabulary ---------------------------------------------------------------

def encode_text(text: str) -> np.ndarray:
    """``"sos 1"`` -> character ids [len(text)] int32 (no BOS or EOS)."""
    try:
        return np.asarray([_CHAR_IDS[c] for c in text], np.int32)
    except KeyError as e:
        raise DataError(f"character {e.args[0]!r} is not in the transcript vocabulary "
                        f"(a-z, 0-9 and space)") from None


def decode_text(ids: Sequence[int] | np.ndarray) -> str:
    """Character ids -> text: PAD and BOS skipped, everything from the first EOS on dropped."""
    out = []
    for i in (int(i) for i in ids):
        if i == EOS_ID:
            break
        if i in (PAD_ID, BOS_ID):
            continue
        if not CHAR_BASE <= i < VOCAB_SIZE:
            raise DataError(f"id {i} is not in the transcript vocabulary (0..{VOCAB_SIZE - 1})")
        out.append(CHARS[i - CHAR_BASE])
    return "".join(out)


def random_text(rng: np.random.Generator, min_chars: int, max_chars: int,
                space_p: float = 0.15) -> str:
    """``min_chars`` to ``max_chars`` characters of a-z0-9 with single inner spaces."""
    symbols = CHARS[:-1]
    n = int(rng.integers(min_chars, max_chars + 1))
    out: list[str] = []
    for i in range(n):
        inner = 0 < i < n - 1 and out[-1] != " "
        out.append(" " if inner and rng.random() < space_p else symbols[rng.integers(len(symbols))])
    return "".join(out)


def is_heldout(text: str) -> bool:
    """The fixed split: texts whose CRC-32 is 0 mod 10 are held out."""
    return zlib.crc32(text.encode("ascii")) % 10 == 0


def character_error_rate(hyps: str | Sequence[str], refs: str | Sequence[str]) -> float:
    """Levenshtein edits (substitutions, insertions, deletions) summed over the pairs, over the
    reference characters summed: ``character_error_rate("abd", "abc") == 1 / 3``."""
    hyps, refs = ([hyps], [refs]) if isinstance(refs, str) else (list(hyps), list(refs))
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    total = sum(len(r) for r in refs)
    if total == 0:
        raise ValueError("the references hold no characters: the CER is undefined")
    return sum(_edit_distance(h, r) for h, r in zip(hyps, refs, strict=True)) / total


def _edit_distance(a: str, b: str) -> int:
    """Levenshtein distance, one row of the dynamic programme at a time."""
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev_diag, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev_diag, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev_diag + (ca != cb))
    return row[-1]


# --- Morse timing and audio ------------------------------------------------------------------

def keying(text: str) -> list[tuple[bool, int]]:
    """The key's runs for ``text``: [(sounding, length in dots)], from the first element's start
    to the last element's end."""
    if text != text.strip(" ") or "  " in text:
        raise DataError(f"{text!r}: leading, trailing or double spaces have no Morse code of "
                        "their own (a word gap is one space)")
    runs: list[tuple[bool, int]] = []
    for w, word in enumerate(text.split(" ")):
        for c, char in enumerate(word):
            if char not in MORSE:
                raise DataError(f"character {char!r} has no Morse code (a-z, 0-9 and space)")
            if w or c:
                runs.append((False, CHAR_GAP if c else WORD_GAP))
            for e, element in enumerate(MORSE[char]):
                if e:
                    runs.append((False, ELEMENT_GAP))
                runs.append((True, 1 if element == "." else DASH_UNITS))
    return runs


def text_units(text: str) -> int:
    """``text``'s keyed length in dots (first element's start to last element's end)."""
    return sum(n for _, n in keying(text))


def clip_seconds(text: str, wpm: float, lead_seconds: float = 0.0,
                 tail_seconds: float = 0.0) -> float:
    return lead_seconds + text_units(text) * DOT_SECONDS_AT_1_WPM / wpm + tail_seconds


def key_envelope(text: str, wpm: float, sample_rate: int = 16000, lead_seconds: float = 0.0,
                 tail_seconds: float = 0.0) -> np.ndarray:
    """The key envelope [N] float32 in [0, 1], N = round(sample_rate * clip_seconds(...)): the
    rectangular keying (1 from each element's first sample to its last) filtered by a Hann
    kernel of RAMP_SECONDS, so each edge rises or falls over 4 ms centred on it and the
    envelope is above 1/2 exactly on the keyed samples."""
    dot = DOT_SECONDS_AT_1_WPM / wpm
    n = int(round(sample_rate * clip_seconds(text, wpm, lead_seconds, tail_seconds)))
    keyed = np.zeros(n, np.float64)
    units = 0
    for sounding, length in keying(text):
        if sounding:
            # Edges from the cumulative time, so rounding never drifts over a long text.
            start = int(round(sample_rate * (lead_seconds + units * dot)))
            end = int(round(sample_rate * (lead_seconds + (units + length) * dot)))
            keyed[start:end] = 1.0
        units += length
    # An odd, symmetric kernel no longer than half a dot: a dot still reaches full amplitude.
    half = int(round(sample_rate * min(RAMP_SECONDS, dot / 2) / 2))
    kernel = np.hanning(2 * half + 3)[1:-1]  # without its zero end points
    return np.convolve(keyed, kernel / kernel.sum(), mode="same").astype(np.float32)


def morse_tone(text: str, wpm: float, tone_hz: float, amplitude: float = 0.5,
               sample_rate: int = 16000, lead_seconds: float = 0.0, tail_seconds: float = 0.0,
               phase: float = 0.0) -> np.ndarray:
    """The noise-free clip [N] float32: ``amplitude * key_envelope * sin(2 pi tone_hz t +
    phase)``."""
    envelope = key_envelope(text, wpm, sample_rate, lead_seconds, tail_seconds)
    t = np.arange(len(envelope)) / sample_rate
    return (amplitude * envelope * np.sin(2 * np.pi * tone_hz * t + phase)).astype(np.float32)


DEFAULT_SPEC = MorseSpec()  # here: validating a spec needs the timing above


def _uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def render_morse(text: str, rng: np.random.Generator, spec: MorseSpec = DEFAULT_SPEC
                 ) -> np.ndarray:
    """``text`` as one noisy clip [N <= spec.max_samples] float32 at ``spec.sample_rate``, its
    style drawn from ``rng`` within ``spec``'s ranges (the speed from the part of
    ``spec.wpm`` at which it fits in ``spec.max_seconds``); a DataError when it cannot fit."""
    lead, tail = _uniform(rng, spec.margin_seconds), _uniform(rng, spec.margin_seconds)
    needed_wpm = text_units(text) * DOT_SECONDS_AT_1_WPM / (spec.max_seconds - lead - tail)
    if needed_wpm > spec.wpm[1]:
        raise DataError(f"{text!r} lasts more than max_seconds {spec.max_seconds} even at "
                        f"{spec.wpm[1]} WPM")
    wpm = _uniform(rng, (max(spec.wpm[0], needed_wpm), spec.wpm[1]))
    amplitude = _uniform(rng, spec.amplitude)
    clean = morse_tone(text, wpm, _uniform(rng, spec.tone_hz), amplitude, spec.sample_rate,
                       lead, tail, _uniform(rng, (0.0, 2 * np.pi)))
    noise_std = amplitude / np.sqrt(2) / 10 ** (_uniform(rng, spec.snr_db) / 20)
    # Rounding the edges can add a sample past max_seconds; the cap keeps batches one shape.
    wave = clean + noise_std * rng.standard_normal(len(clean))
    return wave[:spec.max_samples].astype(np.float32)


def _fits(text: str, spec: MorseSpec) -> bool:
    return clip_seconds(text, spec.wpm[1], *[spec.margin_seconds[1]] * 2) <= spec.max_seconds


def random_example(rng: np.random.Generator, heldout: bool, spec: MorseSpec = DEFAULT_SPEC,
                   max_tries: int = 10_000) -> tuple[np.ndarray, str]:
    """One (clip [N] float32, text) on the requested side of the split: texts are redrawn until
    one is on that side and fits at the fastest speed with the longest margins."""
    for _ in range(max_tries):
        text = random_text(rng, spec.min_chars, spec.max_chars, spec.space_p)
        if is_heldout(text) == heldout and _fits(text, spec):
            return render_morse(text, rng, spec), text
    raise DataError(f"no {'held-out' if heldout else 'training'} text in {max_tries} draws "
                    f"fits MorseSpec(min_chars={spec.min_chars}, max_chars={spec.max_chars}, "
                    f"max_seconds={spec.max_seconds})")


def train_example(seed: int, step: int, row: int, spec: ClipSpec = DEFAULT_SPEC
                  ) -> tuple[np.ndarray, str]:
    """Training row ``row`` of step ``step``: a pure function of (seed, step, row)."""
    return spec.draw(np.random.default_rng([seed, step, row]), False)


def heldout_example(k: int, spec: ClipSpec = DEFAULT_SPEC) -> tuple[np.ndarray, str]:
    """Held-out example ``k``: the same for every seed and run."""
    return spec.draw(np.random.default_rng([_VAL_KEY, k]), True)


@dataclasses.dataclass(frozen=True)
class SpeechBatch:
    waves: np.ndarray  # [B, S] float32, zero after each clip's end
    lengths: np.ndarray  # [B] int32 samples
    texts: list[str]


def pad_batch(examples: Sequence[tuple[np.ndarray, str]], n_samples: int) -> SpeechBatch:
    """(clip, text) pairs -> one SpeechBatch padded with silence to ``n_samples``."""
    waves = np.zeros((len(examples), n_samples), np.float32)
    for b, (wave, _) in enumerate(examples):
        if len(wave) > n_samples:
            raise DataError(f"a clip of {len(wave)} samples does not fit in {n_samples}")
        waves[b, :len(wave)] = wave
    return SpeechBatch(waves, np.asarray([len(w) for w, _ in examples], np.int32),
                       [text for _, text in examples])


def train_batch(seed: int, step: int, batch_size: int, spec: ClipSpec = DEFAULT_SPEC
                ) -> SpeechBatch:
    """Rows 0..B-1 of step ``step``, padded to ``spec.max_samples``."""
    rows = [train_example(seed, step, b, spec) for b in range(batch_size)]
    return pad_batch(rows, spec.max_samples)


def heldout_batch(start: int, batch_size: int, spec: ClipSpec = DEFAULT_SPEC) -> SpeechBatch:
    """Held-out examples start..start+B-1, padded to ``spec.max_samples``."""
    rows = [heldout_example(k, spec) for k in range(start, start + batch_size)]
    return pad_batch(rows, spec.max_samples)
