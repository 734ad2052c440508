"""Whisper's audio front end (jaxformer.models.audio) and the encoder-decoder that reads audio:
the convolutions against a naive loop written here, output shapes, the sinusoidal positions,
the log-Mel features against the full-clip spectrogram, and that padding a clip with more
silence changes nothing the decoder reads."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models import presets
from jaxformer.models.audio import (
    AudioFrontEnd,
    conv1d,
    encoder_segment_ids,
    frame_mask,
    log_mel_features,
)
from jaxformer.models.encoder_decoder import EncoderDecoderLM
from jaxformer.nn.spectrogram import log_mel_spectrogram

SR = 16000


def _cfg(**kw) -> ModelConfig:
    base = dict(n_layers=1, n_decoder_layers=1, d_model=32, n_heads=2, d_ff=64, vocab_size=40,
                audio_mels=16, max_len=160)
    return presets.whisper(**{**base, **kw})


def _naive_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray, stride: int) -> np.ndarray:
    """x [T, C], w [K, C, D] -> [ceil(T / stride), D], zero-padded by K // 2, float64."""
    k = w.shape[0]
    padded = np.concatenate([np.zeros((k // 2, x.shape[1])), x, np.zeros((k // 2, x.shape[1]))])
    out = []
    for s in range(0, x.shape[0], stride):
        out.append(sum(padded[s + i] @ w[i] for i in range(k)) + b)
    return np.asarray(out)


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))


def _tone(n: int, start: int, stop: int, seed: int = 0) -> np.ndarray:
    """A 700 Hz burst from sample start to stop, weak noise elsewhere; zero past ``stop``."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    wave = 0.5 * np.sin(2 * np.pi * 700 * t) * ((np.arange(n) >= start) & (np.arange(n) < stop))
    wave += 0.01 * rng.standard_normal(n)
    wave[stop:] = 0.0
    return wave.astype(np.float32)


@pytest.mark.parametrize("stride,t", [(1, 9), (2, 9), (2, 10)])
def test_conv1d_matches_a_naive_loop(stride, t):
    rng = np.random.default_rng(stride + t)
    x, w, b = rng.normal(size=(2, t, 5)), rng.normal(size=(3, 5, 4)), rng.normal(size=4)
    got = np.asarray(conv1d(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                            jnp.asarray(b, jnp.float32), stride))
    assert got.shape == (2, -(-t // stride), 4)
    for row in range(2):
        np.testing.assert_allclose(got[row], _naive_conv(x[row], w, b, stride), rtol=1e-5,
                                   atol=1e-5)


def test_frame_mask_and_encoder_segment_ids():
    mask = frame_mask(np.array([1600, 1759, 160 * 7]), 1600)  # 10 frames of 160 samples
    assert mask.tolist() == [[1] * 10, [1] * 10, [1] * 7 + [0] * 3]
    seg = np.asarray(encoder_segment_ids(jnp.asarray(mask)))
    # encoder frame s is centred on spectrogram frame 2s: 7 frames -> 4 encoder frames
    assert seg.tolist() == [[1] * 5, [1] * 5, [1] * 4 + [0]]


def test_log_mel_features_match_the_spectrogram_of_the_clip():
    """On a clip's own frames, the features are Whisper's log-Mel of the clip followed by
    silence (the peak lies inside the clip); past it they are zero."""
    n, length = 8000, 5000
    wave = _tone(n, 1000, 4000)
    wave[length:] = 0.0
    mask = frame_mask(np.array([length]), n)
    got = np.asarray(log_mel_features(jnp.asarray(wave[None]), jnp.asarray(mask), SR, 16))[0]
    want = np.asarray(log_mel_spectrogram(np.concatenate([wave, np.zeros(400, np.float32)]),
                                          SR, n_mels=16))
    valid = length // 160
    np.testing.assert_allclose(got[:valid], want[:valid], rtol=1e-5, atol=1e-5)
    assert np.all(got[valid:] == 0.0) and np.abs(got[:valid]).max() > 0.5


def test_front_end_matches_naive_math():
    """Features -> conv (k3) -> GELU -> zero past the clip -> conv (k3, stride 2) -> GELU ->
    + the 2017 sinusoids, recomputed here in float64."""
    cfg = _cfg()
    front = AudioFrontEnd(cfg, rngs=nnx.Rngs(0))
    n, length = 4800, 3300  # 30 frames, 20 of them the clip's
    wave = _tone(n, 500, length, seed=1)
    mask = frame_mask(np.array([length]), n)
    x, seg = front(jnp.asarray(wave[None]), jnp.asarray(mask))
    assert x.shape == (1, 15, 32) and np.asarray(seg).tolist() == [[1] * 10 + [0] * 5]
    feats = np.asarray(log_mel_features(jnp.asarray(wave[None]), jnp.asarray(mask), SR, 16),
                       np.float64)[0]
    p = {k: np.asarray(getattr(front, k)[...], np.float64)
         for k in ("conv1_w", "conv1_b", "conv2_w", "conv2_b")}
    h = _gelu(_naive_conv(feats, p["conv1_w"], p["conv1_b"], 1)) * mask[0][:, None]
    h = _gelu(_naive_conv(h, p["conv2_w"], p["conv2_b"], 2))
    pos = np.arange(15)[:, None] / 10000.0 ** (2 * np.arange(16)[None, :] / 32)
    table = np.stack([np.sin(pos), np.cos(pos)], axis=-1).reshape(15, 32)
    np.testing.assert_allclose(np.asarray(x[0]), h + table, rtol=1e-4, atol=1e-4)


def test_positions_are_fixed_sinusoids():
    """With the convolutions zeroed the front end gives GELU(0) + positions = the positions:
    no parameter holds them, and position s's channel pair (2i, 2i + 1) is
    (sin, cos)(s / 10000^(2i / D))."""
    cfg = _cfg()
    front = AudioFrontEnd(cfg, rngs=nnx.Rngs(0))
    for name in ("conv1_w", "conv1_b", "conv2_w", "conv2_b"):
        getattr(front, name)[...] = jnp.zeros_like(getattr(front, name)[...])
    x, _ = front(jnp.zeros((1, 3200)), jnp.ones((1, 20), jnp.int32))
    x = np.asarray(x[0])
    s, i = 7, 3
    angle = s / 10000.0 ** (2 * i / 32)
    assert x[s, 2 * i] == pytest.approx(math.sin(angle), abs=1e-5)
    assert x[s, 2 * i + 1] == pytest.approx(math.cos(angle), abs=1e-5)
    params = nnx.state(front, nnx.Param)
    assert sorted(k for k in params) == ["conv1_b", "conv1_w", "conv2_b", "conv2_w"]


def test_padding_does_not_change_the_result():
    """A clip of 1.3 s padded to 2 s and to 3 s: the same memory on its frames and the same
    decoder logits (attention, cross-attention and the kernels never read the padding)."""
    graphdef, params = nnx.split(EncoderDecoderLM(_cfg(max_len=160), rngs=nnx.Rngs(0)))

    @jax.jit
    def run(wave, mask, dec):
        model = nnx.merge(graphdef, params)
        memory, seg = model.encode_audio(wave, mask)
        return memory, seg, model.audio_logits(wave, mask, dec)

    length = 20800
    clip = _tone(length, 2000, 18000, seed=2)
    dec = jnp.asarray([[1, 5, 9, 12]])
    outs = []
    for n in (32000, 48000):
        wave = np.zeros((1, n), np.float32)
        wave[0, :length] = clip
        mask = jnp.asarray(frame_mask(np.array([length]), n))
        outs.append(tuple(np.asarray(x) for x in run(jnp.asarray(wave), mask, dec)))
    (m1, s1, l1), (m2, s2, l2) = outs
    real = int(s1.sum())
    assert real == 65 and int(s2.sum()) == real
    np.testing.assert_allclose(m1[:, :real], m2[:, :real], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)
    # and the clip matters: another clip of the same length gives other logits
    other = np.zeros((1, 32000), np.float32)
    other[0, :length] = _tone(length, 9000, 12000, seed=3)
    l3 = np.asarray(run(jnp.asarray(other), jnp.asarray(frame_mask(np.array([length]), 32000)),
                        dec)[2])
    assert np.abs(l3 - l1).max() > 1e-3


def test_token_encoder_call_is_refused_on_an_audio_model():
    model = EncoderDecoderLM(_cfg(), rngs=nnx.Rngs(0))
    assert model.enc_inputs is None
    with pytest.raises(ValueError, match="reads audio"):
        model.encode(jnp.ones((1, 4), jnp.int32))


def test_audio_model_gradients_reach_the_convolutions():
    model = EncoderDecoderLM(_cfg(), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    wave = jnp.asarray(_tone(3200, 200, 3000)[None])
    mask = jnp.asarray(frame_mask(np.array([3000]), 3200))

    def loss(p):
        logits = nnx.merge(graphdef, p).audio_logits(wave, mask, jnp.asarray([[1, 4, 5]]))
        return jax.nn.logsumexp(logits).sum()

    grads = jax.jit(jax.grad(loss))(params)
    assert float(jnp.abs(grads["audio"]["conv1_w"][...]).max()) > 0
