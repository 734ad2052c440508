"""The log-Mel spectrogram front end of Whisper, in jax.numpy: jit-able and differentiable.

Radford, Kim, Xu, Brockman, McLeavey and Sutskever (2022), "Robust Speech Recognition via
Large-Scale Weak Supervision" (Whisper), section 2.2: 16 kHz audio, "an 80-channel log-magnitude
Mel spectrogram representation computed on 25-millisecond windows with a stride of 10
milliseconds", globally scaled to about [-1, 1]. Exactly, as ``whisper/audio.py`` and
transformers' ``WhisperFeatureExtractor`` compute it:

1. STFT: n_fft 400 (25 ms), hop 160 (10 ms), a periodic Hann window
   (``0.5 - 0.5 cos(2 pi n / n_fft)``, ``torch.hann_window``'s default), frames centred: the
   wave is padded by n_fft // 2 samples on both sides by reflection (torch.stft's
   ``pad_mode="reflect"``; librosa >= 0.10 pads with zeros by default, so pass
   ``pad_mode="reflect"`` to compare). A wave of N samples gives 1 + N // hop frames.
2. Power ``|STFT|^2`` (n_fft // 2 + 1 = 201 frequency bins).
3. Whisper drops the last frame (``stft[..., :-1]``): N // hop frames remain, so 30 s (480,000
   samples) gives exactly 3,000.
4. A Slaney Mel filter bank (librosa's default, ``librosa.filters.mel(htk=False,
   norm="slaney")``): 80 triangles from fmin 0 to fmax sample_rate / 2, evenly spaced on the
   Slaney Mel scale (linear below 1 kHz, logarithmic above), each scaled to unit area
   (2 / its width in Hz).
5. ``log10(max(mel, 1e-10))``, clamped from below at (its maximum over the whole example) - 8,
   then ``(x + 4) / 4``.

Letters: B batch (any leading axes), N samples, T frames, F frequency bins (n_fft // 2 + 1),
M Mel channels.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
LOG_FLOOR = 1e-10  # Whisper's clamp before log10
DYNAMIC_RANGE = 8.0  # decades kept below the example's maximum

# The Slaney Mel scale (Slaney 1998, "Auditory Toolbox"; librosa.hz_to_mel with htk=False):
# linear, 3 Mel per 200 Hz, up to 1 kHz, then logarithmic with 27 Mel per factor 6.4.
_F_SP = 200.0 / 3
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = np.log(6.4) / 27.0


def check_sample_rate(expected: int, got: int) -> None:
    """A ValueError when audio at ``got`` Hz meets a front end configured for ``expected`` Hz
    (resampling is the data pipeline's job, not the front end's)."""
    if int(got) != int(expected):
        raise ValueError(f"audio at {got} Hz; the front end is configured for {expected} Hz")


def _check_positive(**values: float) -> None:
    for name, value in values.items():
        if not value > 0:
            raise ValueError(f"{name} must be positive, got {value}")


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Frequencies in Hz -> the Slaney Mel scale (librosa's default, not HTK's)."""
    hz = np.asarray(hz, np.float64)
    log_part = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(hz >= _MIN_LOG_HZ, log_part, hz / _F_SP)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """The inverse of ``hz_to_mel``."""
    mel = np.asarray(mel, np.float64)
    log_part = _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log_part, mel * _F_SP)


def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float = 0.0,
                   fmax: float | None = None) -> np.ndarray:
    """The Slaney-normalized Mel filter bank [M, n_fft // 2 + 1] float64 (numpy: a constant).

    Filter m is the triangle over Mel points m, m + 1, m + 2 of n_mels + 2 points evenly spaced
    in Mel from fmin to fmax (default sample_rate / 2), evaluated at the rfft bin frequencies
    and scaled by 2 / (hz[m + 2] - hz[m]) so that every filter has unit area."""
    _check_positive(sample_rate=sample_rate, n_fft=n_fft, n_mels=n_mels)
    fmax = sample_rate / 2 if fmax is None else fmax
    if not 0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2 = {sample_rate / 2}, "
                         f"got fmin {fmin}, fmax {fmax}")
    bins_hz = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)  # [F]
    points_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    widths = np.diff(points_hz)  # [M + 1]
    offsets = points_hz[:, None] - bins_hz[None, :]  # [M + 2, F]
    rising = -offsets[:-2] / widths[:-1, None]
    falling = offsets[2:] / widths[1:, None]
    triangles = np.maximum(0.0, np.minimum(rising, falling))  # [M, F]
    return triangles * (2.0 / (points_hz[2:] - points_hz[:-2]))[:, None]


@functools.lru_cache(maxsize=16)
def _filterbank_f32(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    bank = mel_filterbank(sample_rate, n_fft, n_mels).astype(np.float32)
    bank.flags.writeable = False  # shared by every caller of the cache
    return bank


def hann_window(n: int) -> np.ndarray:
    """The periodic Hann window [n] (torch.hann_window and scipy's ``hann(n, sym=False)``): the
    STFT's windows then overlap-add to a constant at hop n / 4, n / 2..."""
    return 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)


def num_frames(n_samples: int, hop: int = HOP) -> int:
    """Frames of ``log_mel_spectrogram``: N // hop (the centred STFT's 1 + N // hop, less the
    last frame, which Whisper drops)."""
    return n_samples // hop


def stft_power(wave: jnp.ndarray, n_fft: int = N_FFT, hop: int = HOP) -> jnp.ndarray:
    """``|STFT|^2`` of ``wave`` [..., N] -> [..., 1 + N // hop, n_fft // 2 + 1] float32.

    Centred frames (the wave reflect-padded by n_fft // 2 on both sides), a periodic Hann
    window, all frames kept (``log_mel_spectrogram`` drops the last, as Whisper does)."""
    _check_positive(n_fft=n_fft, hop=hop)
    wave = jnp.asarray(wave, jnp.float32)
    if wave.ndim < 1:
        raise ValueError("wave must have a sample axis: [..., N]")
    n = wave.shape[-1]
    pad = n_fft // 2
    if n <= pad:  # reflection needs more samples than it pads with (torch.stft refuses too)
        raise ValueError(f"a wave of {n} samples is too short for n_fft {n_fft}: centred "
                         f"frames reflect-pad by {pad}, so it needs at least {pad + 1}")
    padded = jnp.pad(wave, [(0, 0)] * (wave.ndim - 1) + [(pad, pad)], mode="reflect")
    starts = hop * np.arange(1 + n // hop)
    frames = padded[..., starts[:, None] + np.arange(n_fft)[None, :]]  # [..., T + 1, n_fft]
    spectrum = jnp.fft.rfft(frames * hann_window(n_fft).astype(np.float32), axis=-1)
    return jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2  # [..., T + 1, F]


def mel_power(wave: jnp.ndarray, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
              hop: int = HOP, n_mels: int = N_MELS) -> jnp.ndarray:
    """The Mel power spectrogram [..., 1 + N // hop, M] of ``wave`` [..., N] (every frame, before
    the log: ``librosa.feature.melspectrogram(power=2.0, pad_mode="reflect")``, frames last)."""
    _check_positive(sample_rate=sample_rate, n_mels=n_mels)
    bank = _filterbank_f32(int(sample_rate), int(n_fft), int(n_mels))  # [M, F]
    return jnp.einsum("...TF,MF->...TM", stft_power(wave, n_fft, hop), bank)


def log_mel_spectrogram(wave: jnp.ndarray, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT,
                        hop: int = HOP, n_mels: int = N_MELS) -> jnp.ndarray:
    """Whisper's input features: ``wave`` [..., N] at ``sample_rate`` -> [..., N // hop, M].

    The Mel power without its last frame, ``log10(max(mel, 1e-10))``, clamped at each example's
    maximum - 8 (the maximum over its frames and channels), then ``(x + 4) / 4``; equal to
    transformers' ``WhisperFeatureExtractor`` (transposed: frames first) for an unpadded wave.
    ``sample_rate`` builds the filter bank; check the audio's own rate with
    ``check_sample_rate``."""
    mel = mel_power(wave, sample_rate, n_fft, hop, n_mels)[..., :-1, :]
    log_spec = jnp.log10(jnp.maximum(mel, LOG_FLOOR))
    peak = jnp.max(log_spec, axis=(-2, -1), keepdims=True)
    return (jnp.maximum(log_spec, peak - DYNAMIC_RANGE) + 4.0) / 4.0
