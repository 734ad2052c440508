"""Positional information: absolute (learned, sinusoidal, 2-D sinusoidal over image patches),
rotary (RoPE) and attention biases (ALiBi, T5 buckets, Shaw-style clipped offsets).

Every function takes explicit integer positions ([B, T] for queries, [B, S] for keys) rather
than ``arange(T)``: packed documents restart at position 0, and a decode step sits at the end of
its cache, so the caller is the only one who knows where each token is.

The attention biases return ``[B, N, T, S]`` float32, to be added to the float32 scores before
the softmax; the bias depends only on positions, never on content.

Letters: B batch, T query length, S key length, D model width, N heads, H head dim,
R rotated channels of a head (RoPE), L the longest supported length (learned positions).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.nn.params import normal_param

# ---------------------------------------------------------------------------------------------
# Absolute encodings, added to the token embeddings.


class LearnedPositions(nnx.Module):
    def __init__(self, max_len: int, d_model: int, *, init_std: float, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.table = normal_param(rngs, (max_len, d_model), (None, "embed"), init_std,
                                  param_dtype)

    def __call__(self, positions: jnp.ndarray) -> jnp.ndarray:
        """positions: [B, T] int -> [B, T, D]."""
        return jnp.take(self.table[...], positions, axis=0).astype(self.dtype)


def sinusoidal_encoding(positions: jnp.ndarray, d_model: int,
                        base: float = 10000.0) -> jnp.ndarray:
    """PE[t, 2i] = sin(t / base^(2i/D)), PE[t, 2i+1] = cos(t / base^(2i/D)).

    positions: [B, T] int -> [B, T, D] float32 (sin and cos interleaved, as in the paper).
    """
    half = jnp.arange(d_model // 2, dtype=jnp.float32)
    inv_freq = base ** (-2.0 * half / d_model)  # [D/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, D/2]
    pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [B, T, D/2, 2]
    pe = pe.reshape(*positions.shape, -1)
    if d_model % 2:  # odd width: the last channel has no partner
        pe = jnp.pad(pe, [(0, 0)] * (pe.ndim - 1) + [(0, 1)])
    return pe


def sinusoidal_2d_encoding(rows: int, cols: int, d_model: int,
                           base: float = 10000.0) -> np.ndarray:
    """The 2-D sin-cos encoding of a rows x cols grid of image patches (MAE, He et al. 2022;
    "simple ViT", Beyer et al. 2022): a quarter of the channels each for sin and cos of the
    patch's row and of its column,

        PE[n] = [sin(r w), cos(r w), sin(c w), cos(c w)],  w_i = base^(-i / (D/4)), i < D/4,

    for patch n at row r = n // cols, column c = n % cols (row-major, the order of
    ``models.vision.patchify``). -> [rows * cols, D] float32 (numpy: a constant of the shapes).
    D must be a multiple of 4.
    """
    if d_model % 4:
        raise ValueError(f"sinusoidal_2d_encoding: d_model={d_model} must be a multiple of 4")
    quarter = d_model // 4
    omega = base ** (-np.arange(quarter, dtype=np.float64) / quarter)  # [D/4]
    r, c = np.divmod(np.arange(rows * cols), cols)  # [N] each
    ra, ca = r[:, None] * omega, c[:, None] * omega  # [N, D/4]
    pe = np.concatenate([np.sin(ra), np.cos(ra), np.sin(ca), np.cos(ca)], axis=1)
    return pe.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Rotary embeddings (Su et al., 2021), applied to queries and keys.


def apply_rope(x: jnp.ndarray, positions: jnp.ndarray, *, theta: float = 10000.0,
               fraction: float = 1.0, interleaved: bool = False) -> jnp.ndarray:
    """Rotate channel pairs of every head by ``position * theta^(-2i/R)``.

    x: [B, T, N, H] (queries or keys, any dtype), positions: [B, T] int -> [B, T, N, H] in the
    dtype of x. Because each pair is rotated by an angle linear in its position, the score
    <rope(q, m), rope(k, n)> depends on m and n only through m - n.

    fraction: partial rotary (GPT-NeoX, Phi; ``partial_rotary_factor`` in transformers): only the
      first R = int(H * fraction) channels are rotated, the rest pass through unchanged. The
      frequencies use R, not H, as their denominator, as those models do.
    interleaved: False pairs channel i with i + R/2 (Llama, GPT-NeoX and transformers'
      ``rotate_half``); True pairs adjacent channels 2i, 2i+1 (the RoFormer paper, Meta's
      original Llama code, GPT-J). The two are the same map up to a fixed permutation of the
      channels, so checkpoints must be converted between them (transformers permutes q/k weights
      when importing Meta's Llama).
    """
    h = x.shape[-1]
    rot = int(h * fraction)
    if rot % 2 or not 0 <= rot <= h:
        raise ValueError(f"apply_rope: int(head_dim {h} * fraction {fraction}) = {rot} rotated "
                         "channels; it must be even and between 0 and head_dim")
    if rot == 0:
        return x
    half = rot // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / rot)  # [R/2]
    # float32 angles: in bfloat16 a position of a few hundred already loses its low bits.
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, R/2], broadcast over heads
    sin = jnp.sin(angles)[:, :, None, :]

    x_rot = x[..., :rot].astype(jnp.float32)
    if interleaved:
        pairs = x_rot.reshape(*x_rot.shape[:-1], half, 2)
        x1, x2 = pairs[..., 0], pairs[..., 1]
    else:
        x1, x2 = x_rot[..., :half], x_rot[..., half:]
    y1 = x1 * cos - x2 * sin
    y2 = x2 * cos + x1 * sin
    if interleaved:
        y_rot = jnp.stack([y1, y2], axis=-1).reshape(x_rot.shape)
    else:
        y_rot = jnp.concatenate([y1, y2], axis=-1)
    return jnp.concatenate([y_rot.astype(x.dtype), x[..., rot:]], axis=-1)


# ---------------------------------------------------------------------------------------------
# ALiBi (Press et al., 2022): a fixed linear penalty on distance, one slope per head.


def alibi_slopes(n_heads: int) -> np.ndarray:
    """The per-head slopes of the paper's reference code. -> [N] float32 (numpy: static).

    For N a power of 2: the geometric sequence 2^(-8/N), 2^(-16/N), ..., 2^(-8). Otherwise the
    sequence for the largest power of 2 P below N, followed by every other slope of the
    sequence for 2P (its odd-numbered terms), until there are N (ofirpress/
    attention_with_linear_biases ``get_slopes``; BLOOM's ``build_alibi_tensor``).
    """
    if n_heads < 1:
        raise ValueError(f"alibi_slopes: n_heads must be positive, got {n_heads}")

    def geometric(n: int) -> np.ndarray:  # n a power of 2
        return 2.0 ** (-8.0 * np.arange(1, n + 1) / n)

    p = 1 << (n_heads.bit_length() - 1)  # largest power of 2 <= n_heads, exact in integers
    slopes = geometric(p)
    if p != n_heads:
        slopes = np.concatenate([slopes, geometric(2 * p)[0::2][: n_heads - p]])
    return slopes.astype(np.float32)


def alibi_bias(slopes: jnp.ndarray, q_positions: jnp.ndarray,
               k_positions: jnp.ndarray) -> jnp.ndarray:
    """bias[b, n, i, j] = slopes[n] * (k_positions[b, j] - q_positions[b, i]).

    slopes: [N], q_positions: [B, T] int, k_positions: [B, S] int -> [B, N, T, S] float32.
    Zero on the diagonal and -slope * distance for past keys. Future keys get a positive bias,
    so this is meant for causal attention, where they are masked. (BLOOM adds slope * key
    position instead: a per-row constant away from this, which the softmax ignores.)
    """
    rel = (k_positions[:, None, :] - q_positions[:, :, None]).astype(jnp.float32)  # [B, T, S]
    return jnp.asarray(slopes, jnp.float32)[None, :, None, None] * rel[:, None]


# ---------------------------------------------------------------------------------------------
# Learned relative biases: a scalar per head per (bucketed or clipped) key - query offset.


def _relative_positions(q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
    """key position - query position: [B, T] and [B, S] -> [B, T, S] int32."""
    return (k_positions[:, None, :] - q_positions[:, :, None]).astype(jnp.int32)


def relative_position_bucket(relative_position: jnp.ndarray, *, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> jnp.ndarray:
    """T5's bucketing of key - query offsets (Mesh TensorFlow; transformers'
    ``T5Attention._relative_position_bucket``, reproduced operation for operation).

    relative_position: int array, any shape -> int32 buckets in [0, num_buckets), same shape.
    Bidirectional: half the buckets for keys after the query, half for the rest. Within a half,
    offsets below half of it get a bucket each; larger ones share logarithmically wider buckets,
    and every offset at or beyond ``max_distance`` shares the last one. Unidirectional (causal
    decoders): keys after the query all land in bucket 0 with the query itself.
    """
    rel = jnp.asarray(relative_position).astype(jnp.int32)
    buckets = jnp.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (rel > 0).astype(jnp.int32) * num_buckets
        rel = jnp.abs(rel)
    else:
        rel = -jnp.minimum(rel, 0)
    max_exact = num_buckets // 2
    is_small = rel < max_exact
    # float32 and this order of operations, as the reference: an offset whose log lands near an
    # integer must round the same way, or a whole diagonal reads another bucket's bias.
    # rel = 0 takes the is_small branch; clamping it keeps log(0) = -inf out of the int cast.
    safe = jnp.maximum(rel, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, rel, large)


class T5RelativeBias(nnx.Module):
    """T5's relative attention bias (Raffel et al., 2020): a learned scalar per head per
    ``relative_position_bucket`` of the key - query offset.

    T5 computes it once, in the first layer of each stack, and adds the same bias in every
    layer; the model shares it by creating one instance per stack and passing its output to
    every layer (encoder: bidirectional=True; decoder self-attention: False).
    """

    def __init__(self, n_heads: int, *, num_buckets: int = 32, max_distance: int = 128,
                 bidirectional: bool, init_std: float, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.bidirectional = bidirectional
        self.embedding = normal_param(rngs, (num_buckets, n_heads), (None, "heads"), init_std,
                                      param_dtype)

    def __call__(self, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
        """q_positions: [B, T] int, k_positions: [B, S] int -> [B, N, T, S] float32."""
        buckets = relative_position_bucket(
            _relative_positions(q_positions, k_positions), bidirectional=self.bidirectional,
            num_buckets=self.num_buckets, max_distance=self.max_distance)  # [B, T, S]
        values = jnp.take(self.embedding[...], buckets, axis=0)  # [B, T, S, N]
        return jnp.transpose(values, (0, 3, 1, 2)).astype(jnp.float32)


class ShawRelativeBias(nnx.Module):
    """A learned scalar per head per key - query offset, clipped to [-max_distance,
    max_distance] (the clipped relative positions of Shaw et al., 2018, reduced to a bias on the
    score, as T5 does, rather than their vectors added to the keys and values).

    Table row ``offset + max_distance`` holds the bias of ``offset``; for positions 0..T-1 each
    head's [T, S] bias is a Toeplitz matrix, constant along every diagonal.
    """

    def __init__(self, n_heads: int, *, max_distance: int, init_std: float,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.max_distance = max_distance
        self.table = normal_param(rngs, (2 * max_distance + 1, n_heads), (None, "heads"),
                                  init_std, param_dtype)

    def __call__(self, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray:
        """q_positions: [B, T] int, k_positions: [B, S] int -> [B, N, T, S] float32."""
        m = self.max_distance
        rows = jnp.clip(_relative_positions(q_positions, k_positions), -m, m) + m  # [B, T, S]
        values = jnp.take(self.table[...], rows, axis=0)  # [B, T, S, N]
        return jnp.transpose(values, (0, 3, 1, 2)).astype(jnp.float32)
