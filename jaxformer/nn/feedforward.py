"""Position-wise feed-forward blocks.

Letters: B batch, T length, D model width, F hidden (mlp) width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.params import constant_param, normal_param


class GeluMlp(nnx.Module):
    """Linear(D->F) -> GELU (tanh approximation, as GPT-2) -> Linear(F->D), with biases."""

    def __init__(self, d_model: int, d_ff: int, *, init_std: float, out_std: float,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.wi = normal_param(rngs, (d_model, d_ff), ("embed", "mlp"), init_std, param_dtype)
        self.bi = constant_param((d_ff,), ("mlp",), 0.0, param_dtype)
        self.wo = normal_param(rngs, (d_ff, d_model), ("mlp", "embed"), out_std, param_dtype)
        self.bo = constant_param((d_model,), ("embed",), 0.0, param_dtype)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """x: [B, T, D] -> [B, T, D]."""
        dt = self.dtype
        h = jnp.einsum("BTD,DF->BTF", x.astype(dt), self.wi[...].astype(dt))
        h = jax.nn.gelu(h + self.bi[...].astype(dt), approximate=True)
        y = jnp.einsum("BTF,FD->BTD", h, self.wo[...].astype(dt))
        return y + self.bo[...].astype(dt)
