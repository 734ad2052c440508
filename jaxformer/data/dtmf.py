"""Synthesized touch-tone (DTMF) dialling, offline and deterministic: random key sequences as
dual tones at 16 kHz, for a Whisper-style encoder-decoder to transcribe (label = the keys).

Dual-tone multi-frequency signalling as ITU-T Recommendation Q.23 defines it: each key sounds
one low ("row") and one high ("column") frequency at once (``KEY_TONES``):

    Hz      1209  1336  1477  1633
     697     1     2     3     a
     770     4     5     6     b
     852     7     8     9     c
     941     *     0     #     d

Keys 0-9 and a-d are used (``KEYS``; the transcript vocabulary of ``jaxformer.data.speech``
has no ``*`` or ``#``).

One example (``random_example``), its style drawn uniformly per clip within ``DtmfSpec``:

- keys: ``min_keys`` to ``max_keys`` (length uniform), each uniform over ``KEYS``.
- speed: a tone length and a pause length per clip (Q.24's receivers accept tones and pauses
  from 40 ms; people and diallers vary), each key's tone and the pause after it then jittered
  by a factor in ``1 +- jitter``: speed varies between clips and within one.
- each key: ``a_low sin(2 pi f_low t + p1) + a_high sin(2 pi f_high t + p2)`` with each
  frequency off its nominal value by up to ``freq_tolerance`` (Q.23 allows 1.8%), the high
  tone ``twist_db`` louder or quieter than the low one, random phases, 4 ms raised-cosine
  edges (as ``speech``'s keying), amplitude scaled so the louder tone has ``amplitude``.
- noise: white Gaussian noise at the drawn SNR against the louder tone's power; silence of
  ``margin_seconds`` before and after. float32, not clipped.

Split, determinism and vocabulary as ``jaxformer.data.speech``: a key sequence is held out when
its CRC-32 is 0 mod 10; training row b of step s draws from ``default_rng([seed, s, b])``.

Letters: N samples.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxformer.data import speech
from jaxformer.data.errors import DataError

KEYS = "0123456789abcd"
_ROWS = (697.0, 770.0, 852.0, 941.0)
_COLS = (1209.0, 1336.0, 1477.0, 1633.0)
_LAYOUT = ("123a", "456b", "789c", "*0#d")
KEY_TONES = {key: (_ROWS[r], _COLS[c]) for r, row in enumerate(_LAYOUT)
             for c, key in enumerate(row)}


@dataclasses.dataclass(frozen=True)
class DtmfSpec:
    """What ``random_example`` draws from; (lo, hi) ranges are drawn uniformly per clip."""

    sample_rate: int = 16000
    min_keys: int = 3
    max_keys: int = 7
    tone_seconds: tuple[float, float] = (0.04, 0.15)
    pause_seconds: tuple[float, float] = (0.04, 0.15)
    jitter: float = 0.1  # each key's tone and pause: times a factor in [1 - jitter, 1 + jitter]
    freq_tolerance: float = 0.015
    twist_db: tuple[float, float] = (-4.0, 4.0)  # high tone's level over the low tone's
    amplitude: tuple[float, float] = (0.1, 0.9)
    snr_db: tuple[float, float] = (10.0, 30.0)
    margin_seconds: tuple[float, float] = (0.05, 0.25)  # silence before and after, each
    max_seconds: float = 3.0

    def __post_init__(self) -> None:
        for name in ("tone_seconds", "pause_seconds", "twist_db", "amplitude", "snr_db",
                     "margin_seconds"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise DataError(f"DtmfSpec.{name} = ({lo}, {hi}): need lo <= hi")
        if not (self.sample_rate > 0 and self.tone_seconds[0] > 0 and self.pause_seconds[0] > 0
                and self.amplitude[0] > 0 and self.margin_seconds[0] >= 0):
            raise DataError("DtmfSpec: sample_rate, tone and pause lengths and amplitude must be "
                            "positive, margin_seconds not negative")
        if not 0 <= self.jitter < 1 or not 0 <= self.freq_tolerance < 0.5:
            raise DataError("DtmfSpec: need 0 <= jitter < 1 and 0 <= freq_tolerance < 0.5")
        if max(_COLS) * (1 + self.freq_tolerance) >= self.sample_rate / 2:
            raise DataError(f"DtmfSpec.sample_rate = {self.sample_rate}: the highest tone must "
                            f"stay below the Nyquist frequency")
        if not 1 <= self.min_keys <= self.max_keys:
            raise DataError("DtmfSpec: need 1 <= min_keys <= max_keys")
        if self.longest_seconds > self.max_seconds:
            raise DataError(f"DtmfSpec.max_seconds = {self.max_seconds}: {self.max_keys} keys "
                            f"at the slowest speed last {self.longest_seconds:.2f} s")

    @property
    def max_samples(self) -> int:
        return int(round(self.max_seconds * self.sample_rate))

    @property
    def max_chars(self) -> int:
        """The longest transcript (one character per key)."""
        return self.max_keys

    @property
    def longest_seconds(self) -> float:
        """The longest clip: every key and pause at its slowest, both margins at their longest."""
        slow = 1 + self.jitter
        return (self.max_keys * self.tone_seconds[1] * slow
                + (self.max_keys - 1) * self.pause_seconds[1] * slow
                + 2 * self.margin_seconds[1])

    def draw(self, rng: np.random.Generator, heldout: bool) -> tuple[np.ndarray, str]:
        return random_example(rng, heldout, self)


def dual_tone(f_low: float, f_high: float, n: int, sample_rate: int, a_low: float,
              a_high: float, phases: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """One key's tone [n] float64 with 4 ms raised-cosine edges (at most a quarter of it)."""
    t = np.arange(n) / sample_rate
    wave = (a_low * np.sin(2 * np.pi * f_low * t + phases[0])
            + a_high * np.sin(2 * np.pi * f_high * t + phases[1]))
    ramp = min(int(round(speech.RAMP_SECONDS * sample_rate)), n // 4)
    if ramp:
        edge = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp) + 0.5) / ramp)
        wave[:ramp] *= edge
        wave[n - ramp:] *= edge[::-1]
    return wave


def render_dtmf(keys: str, rng: np.random.Generator, spec: DtmfSpec = DtmfSpec()) -> np.ndarray:
    """``keys`` as one noisy clip [N <= spec.max_samples] float32, its style from ``rng``."""
    for key in keys:
        if key not in KEYS:
            raise DataError(f"key {key!r} has no DTMF tone here (0-9 and a-d)")
    sr = spec.sample_rate
    tone_s, pause_s = (float(rng.uniform(*spec.tone_seconds)),
                       float(rng.uniform(*spec.pause_seconds)))
    amplitude = float(rng.uniform(*spec.amplitude))
    twist = 10 ** (float(rng.uniform(*spec.twist_db)) / 20)  # a_high / a_low
    a_low, a_high = (amplitude, amplitude * twist) if twist <= 1 else (amplitude / twist, amplitude)
    parts = [np.zeros(int(round(sr * rng.uniform(*spec.margin_seconds))))]
    for i, key in enumerate(keys):
        f_low, f_high = (f * (1 + rng.uniform(-spec.freq_tolerance, spec.freq_tolerance))
                         for f in KEY_TONES[key])
        n = int(round(sr * tone_s * rng.uniform(1 - spec.jitter, 1 + spec.jitter)))
        parts.append(dual_tone(f_low, f_high, n, sr, a_low, a_high,
                               tuple(rng.uniform(0, 2 * np.pi, 2))))
        if i < len(keys) - 1:
            parts.append(np.zeros(int(round(sr * pause_s
                                            * rng.uniform(1 - spec.jitter, 1 + spec.jitter)))))
    parts.append(np.zeros(int(round(sr * rng.uniform(*spec.margin_seconds)))))
    clean = np.concatenate(parts)
    noise_std = amplitude / np.sqrt(2) / 10 ** (float(rng.uniform(*spec.snr_db)) / 20)
    wave = clean + noise_std * rng.standard_normal(len(clean))
    return wave[:spec.max_samples].astype(np.float32)


def random_keys(rng: np.random.Generator, min_keys: int, max_keys: int) -> str:
    n = int(rng.integers(min_keys, max_keys + 1))
    return "".join(KEYS[i] for i in rng.integers(len(KEYS), size=n))


def random_example(rng: np.random.Generator, heldout: bool, spec: DtmfSpec = DtmfSpec(),
                   max_tries: int = 10_000) -> tuple[np.ndarray, str]:
    """One (clip [N] float32, keys) on the requested side of the split."""
    for _ in range(max_tries):
        keys = random_keys(rng, spec.min_keys, spec.max_keys)
        if speech.is_heldout(keys) == heldout:
            return render_dtmf(keys, rng, spec), keys
    raise DataError(f"no {'held-out' if heldout else 'training'} key sequence in {max_tries} "
                    f"draws of {spec.min_keys} to {spec.max_keys} keys")
