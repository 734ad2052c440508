"""Whisper's audio front end (Radford et al. 2022, "Robust Speech Recognition via Large-Scale
Weak Supervision", section 2.2 and figure 1): wave -> log-Mel spectrogram -> two convolutions
of kernel 3 with GELU, the second of stride 2 -> + fixed sinusoidal positions -> the first
residual stream of the encoder-decoder's encoder (``models.encoder_decoder``), whose blocks,
decoder and cross-attention are the text model's own.

Letters: B batch, N samples, T spectrogram frames (N // 160), M Mel channels, S encoder frames
((T + 1) // 2), D model width.

**Where the spectrogram is computed: here, in the model.** The model reads what a microphone
gives (a wave at ``model.audio_sample_rate``), so ``jaxformer sample --audio clip.wav`` and
the data pipeline share one feature path and one sample-rate check, the features run on the
accelerator inside the jitted step, and the batches stay raw audio (the data module knows
nothing of Mel filters). It costs about as much as one small convolution per step.

**Padding does not change a clip's result.** Batches pad clips with silence. The front end
(1) appends n_fft // 2 zeros before the centred STFT, so that every frame of the clip reads
zeros past its end whatever the padding (Whisper pads every clip with zeros to 30 s, so this is
what Whisper computes for a clip followed by silence); (2) takes the log-Mel's peak (Whisper's
normalization to 8 decades below it) over the clip's own frames; (3) zeroes the features of
frames past the clip before each convolution, so the kernels at the clip's edge read zeros
whatever follows. ``audio_mask`` [B, T] (1 on the frames t < length // 160) says which frames
are the clip's; encoder frame s (centred on spectrogram frame 2s) is the clip's when frame 2s
is, and its segment id is 1 (0: padding, which attention and cross-attention skip).

Positions: the 2017 Transformer's sinusoids (``nn.positional.sinusoidal_encoding``, sin and cos
interleaved) over the encoder frames; Whisper's ``sinusoids`` puts the sin half before the
cos half, a fixed permutation of the same kind of table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import AUDIO_HOP, ModelConfig
from jaxformer.models.common import dtypes
from jaxformer.nn import spectrogram
from jaxformer.nn.dropout import dropout
from jaxformer.nn.params import constant_param, normal_param
from jaxformer.nn.positional import sinusoidal_encoding

KERNEL = 3
N_FFT = spectrogram.N_FFT
assert AUDIO_HOP == spectrogram.HOP


def frame_mask(lengths: np.ndarray, n_samples: int) -> np.ndarray:
    """Clip lengths [B] in samples, waves padded to ``n_samples`` -> audio_mask [B, T] int32:
    1 on each clip's spectrogram frames t < length // 160."""
    t = spectrogram.num_frames(n_samples, AUDIO_HOP)
    lengths = np.asarray(lengths)
    return (np.arange(t)[None, :] < (lengths // AUDIO_HOP)[:, None]).astype(np.int32)


def encoder_segment_ids(audio_mask: jnp.ndarray) -> jnp.ndarray:
    """audio_mask [B, T] -> encoder segment ids [B, S]: 1 where the stride-2 convolution's
    centre frame 2s is the clip's."""
    return audio_mask[:, ::2].astype(jnp.int32)


def log_mel_features(audio: jnp.ndarray, audio_mask: jnp.ndarray, sample_rate: int,
                     n_mels: int) -> jnp.ndarray:
    """Whisper's features of padded clips: audio [B, N] float, audio_mask [B, T] -> [B, T, M]
    float32, zero on the frames past each clip (module docstring: zeros appended, the peak over
    the clip's frames)."""
    t = audio_mask.shape[1]
    padded = jnp.pad(audio.astype(jnp.float32), [(0, 0), (0, N_FFT // 2)])
    mel = spectrogram.mel_power(padded, sample_rate, N_FFT, AUDIO_HOP, n_mels)[:, :t]
    log_spec = jnp.log10(jnp.maximum(mel, spectrogram.LOG_FLOOR))
    valid = audio_mask.astype(bool)[:, :, None]
    floor = np.log10(spectrogram.LOG_FLOOR)  # the peak of a clip without frames
    peak = jnp.max(jnp.where(valid, log_spec, floor), axis=(1, 2), keepdims=True)
    features = (jnp.maximum(log_spec, peak - spectrogram.DYNAMIC_RANGE) + 4.0) / 4.0
    return jnp.where(valid, features, 0.0)


def conv1d(x: jnp.ndarray, w: jnp.ndarray, b: jnp.ndarray, stride: int = 1) -> jnp.ndarray:
    """x [B, T, C], w [K, C, D], b [D] -> [B, ceil(T / stride), D]: a convolution padded by
    K // 2 on each side (PyTorch's Conv1d(padding=1) for K = 3), output s centred on input
    s * stride."""
    k = w.shape[0]
    y = jax.lax.conv_general_dilated(x, w, window_strides=(stride,),
                                     padding=[(k // 2, k // 2)],
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + b


class AudioFrontEnd(nnx.Module):
    """Waves -> the encoder's input vectors [B, S, D] and their segment ids [B, S].

    Params: ``conv1_w`` [3, M, D], ``conv1_b`` [D], ``conv2_w`` [3, D, D], ``conv2_b`` [D]
    (kernel axes (None, None, embed)), LeCun-normal weights and zero biases, as PyTorch's
    Conv1d default scale (a 0.02 init would make the audio vanish beside the positions).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtypes(cfg)
        self.dtype = dtype
        self.sample_rate, self.n_mels, self.d_model = (cfg.audio_sample_rate, cfg.audio_mels,
                                                       cfg.d_model)
        self.sinusoidal_base, self.dropout = cfg.sinusoidal_base, cfg.dropout
        m, d = cfg.audio_mels, cfg.d_model
        axes = (None, None, "embed")
        self.conv1_w = normal_param(rngs, (KERNEL, m, d), axes, (KERNEL * m) ** -0.5, pdtype)
        self.conv1_b = constant_param((d,), ("embed",), 0.0, pdtype)
        self.conv2_w = normal_param(rngs, (KERNEL, d, d), axes, (KERNEL * d) ** -0.5, pdtype)
        self.conv2_b = constant_param((d,), ("embed",), 0.0, pdtype)

    def __call__(self, audio: jnp.ndarray, audio_mask: jnp.ndarray, *,
                 dropout_rng: jax.Array | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """audio [B, N] float at ``audio_sample_rate``, zero past each clip; audio_mask [B, T]
        (``frame_mask``) -> (x [B, S, D] in the compute dtype, segment ids [B, S] int32)."""
        if audio_mask.shape[1] != spectrogram.num_frames(audio.shape[1], AUDIO_HOP):
            raise ValueError(f"audio_mask has {audio_mask.shape[1]} frames; waves of "
                             f"{audio.shape[1]} samples have {audio.shape[1] // AUDIO_HOP}")
        valid = audio_mask.astype(bool)[:, :, None]
        x = log_mel_features(audio, audio_mask, self.sample_rate, self.n_mels).astype(self.dtype)
        cast = lambda p: p[...].astype(self.dtype)  # noqa: E731
        x = jax.nn.gelu(conv1d(x, cast(self.conv1_w), cast(self.conv1_b)), approximate=False)
        x = jnp.where(valid, x, 0)  # the second kernel must read zeros past the clip
        x = jax.nn.gelu(conv1d(x, cast(self.conv2_w), cast(self.conv2_b), stride=2),
                        approximate=False)
        b, s = x.shape[:2]
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
        x = x + sinusoidal_encoding(positions, self.d_model, self.sinusoidal_base).astype(x.dtype)
        return dropout(x, self.dropout, dropout_rng), encoder_segment_ids(audio_mask)
