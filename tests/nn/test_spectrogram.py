"""Whisper's log-Mel front end (jaxformer.nn.spectrogram) against independent references on the
same waves: transformers' WhisperFeatureExtractor (numpy) for the features, librosa for the
Mel filter bank and the Mel power before the log; plus jit, gradients and its errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import WhisperFeatureExtractor

from jaxformer.nn import spectrogram as spec

SR = 16000
# jitted: one compile per shape, rather than one per primitive in eager mode
log_mel = jax.jit(spec.log_mel_spectrogram)
mel_power = jax.jit(spec.mel_power)


def _wave(n: int, seed: int = 0, scale: float = 0.5) -> np.ndarray:
    """A chirp (300 Hz rising) in light noise, with 0.1 s of exact silence in the middle, so
    the clamp at max - 8 and the 1e-10 floor both act."""
    t = np.arange(n) / SR
    wave = scale * np.sin(2 * np.pi * (300 + 2000 * t) * t)
    wave += 0.01 * scale * np.random.default_rng(seed).standard_normal(n)
    wave[n // 2:n // 2 + SR // 10] = 0.0
    return wave.astype(np.float32)


def _whisper_features(waves: list[np.ndarray]) -> np.ndarray:
    """transformers' features [B, T, M] for equal-length waves, not padded to 30 s: padding to
    the longest of equal waves pads nothing (its default pads every wave to 480,000 samples)."""
    extractor = WhisperFeatureExtractor()  # feature_size 80, n_fft 400, hop 160, 16 kHz
    out = extractor(waves, sampling_rate=SR, padding="longest", return_tensors="np")
    return out.input_features.transpose(0, 2, 1)


@pytest.mark.parametrize("n", [8000, 4321])  # a whole number of hops, and not
def test_log_mel_matches_whisper_feature_extractor(n):
    waves = [_wave(n, seed=0), _wave(n, seed=1, scale=0.01)[::-1].copy()]
    reference = _whisper_features(waves)
    ours = np.asarray(log_mel(np.stack(waves)))
    # Whisper drops the centred STFT's last frame: N // hop frames, not 1 + N // hop.
    assert ours.shape == reference.shape == (2, n // spec.HOP, spec.N_MELS)
    assert spec.num_frames(n) == n // spec.HOP
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-4)
    # each example clamps at its own maximum: the quiet one is not cut off at the loud one's
    assert ours[1].max() < ours[0].max() - 0.25
    # a single wave [N] gives the same features as its row of the batch
    np.testing.assert_allclose(np.asarray(log_mel(waves[1])), ours[1],
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("sr,n_fft,n_mels,fmin,fmax", [
    (16000, 400, 80, 0.0, None),  # Whisper
    (16000, 400, 128, 0.0, None),  # Whisper large-v3
    (22050, 1024, 40, 30.0, 6000.0),
])
def test_filterbank_matches_librosa(sr, n_fft, n_mels, fmin, fmax):
    librosa = pytest.importorskip("librosa")
    reference = librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax,
                                    htk=False, norm="slaney", dtype=np.float64)
    ours = spec.mel_filterbank(sr, n_fft, n_mels, fmin, fmax)
    assert ours.shape == (n_mels, n_fft // 2 + 1)
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-6)


def test_mel_power_matches_librosa_melspectrogram():
    librosa = pytest.importorskip("librosa")
    wave = _wave(4321)
    reference = librosa.feature.melspectrogram(
        y=wave, sr=SR, n_fft=400, hop_length=160, n_mels=80, power=2.0, center=True,
        pad_mode="reflect", window="hann").T  # librosa >= 0.10 pads with zeros unless told
    ours = np.asarray(mel_power(wave))
    assert ours.shape == reference.shape == (1 + 4321 // spec.HOP, spec.N_MELS)
    np.testing.assert_allclose(ours, reference, rtol=1e-5, atol=1e-6 * reference.max())


def test_hann_window_is_periodic():
    # periodic: the symmetric window of n + 1 points without its last
    np.testing.assert_allclose(spec.hann_window(400), np.hanning(401)[:-1], atol=1e-12)


def test_jit_equals_eager():
    wave = _wave(3200)
    eager = spec.log_mel_spectrogram(wave)
    jitted = log_mel(wave)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(eager), rtol=0, atol=1e-6)


def test_gradients_are_finite_and_exact_for_the_mel_power():
    wave = jnp.asarray(_wave(1600))
    grad = jax.jit(jax.grad(lambda w: spec.log_mel_spectrogram(w).sum()))(wave)
    assert grad.shape == wave.shape
    assert bool(jnp.isfinite(grad).all()) and float(jnp.abs(grad).max()) > 0
    # the summed Mel power is quadratic in the wave: a central difference is exact (to rounding)
    direction = jnp.asarray(np.random.default_rng(2).standard_normal(1600), jnp.float32)
    total = jax.jit(lambda w: spec.mel_power(w).sum())
    h = 1e-2
    numeric = (total(wave + h * direction) - total(wave - h * direction)) / (2 * h)
    analytic = jnp.vdot(jax.jit(jax.grad(total))(wave), direction)
    np.testing.assert_allclose(float(analytic), float(numeric), rtol=1e-3)


def test_sample_rate_check():
    spec.check_sample_rate(16000, 16000)
    with pytest.raises(ValueError, match="^audio at 8000 Hz; the front end is configured for "
                                         "16000 Hz$"):
        spec.check_sample_rate(16000, 8000)


@pytest.mark.parametrize("call,message", [
    (lambda: spec.log_mel_spectrogram(np.zeros(200, np.float32)), "too short for n_fft 400"),
    (lambda: spec.stft_power(np.zeros(800, np.float32), hop=0), "hop must be positive"),
    (lambda: spec.mel_filterbank(16000, 400, 80, fmax=9000.0), "fmax <= sample_rate / 2"),
    (lambda: spec.mel_filterbank(16000, 400, 0), "n_mels must be positive"),
])
def test_bad_arguments_are_one_line_value_errors(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
