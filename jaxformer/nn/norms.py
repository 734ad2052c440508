"""Normalization layers. They always compute in float32 and cast back to the input dtype."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.params import constant_param


class LayerNorm(nnx.Module):
    """LayerNorm (Ba et al., 2016) over the last axis, with learned scale and bias [D]."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype: jnp.dtype = jnp.float32):
        self.eps = eps
        self.scale = constant_param((dim,), ("embed",), 1.0, param_dtype)
        self.bias = constant_param((dim,), ("embed",), 0.0, param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [..., D] -> [..., D] in x.dtype."""
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jnp.reciprocal(jnp.sqrt(var + self.eps))
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)
