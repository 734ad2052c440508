"""Absolute positional encodings: learned (GPT-2) and sinusoidal (Vaswani et al., 2017).

Positions are explicit inputs [B, T] so that packed documents each start at position 0.
Letters: B batch, T length, D model width, L the longest supported length.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.params import normal_param


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
