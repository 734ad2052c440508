"""Token embedding with a tied un-embedding (``attend``).

Letters: B batch, T length, D model width, V vocabulary.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.params import normal_param


class Embedding(nnx.Module):
    def __init__(self, vocab_size: int, d_model: int, *, init_std: float, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.table = normal_param(rngs, (vocab_size, d_model), ("vocab", "embed"), init_std,
                                  param_dtype)

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:
        """ids: [B, T] int -> [B, T, D]."""
        return jnp.take(self.table[...], ids, axis=0).astype(self.dtype)

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:
        """Tied un-embedding. x: [B, T, D] -> logits [B, T, V] in float32."""
        logits = jnp.einsum("BTD,VD->BTV", x.astype(self.dtype), self.table[...].astype(self.dtype))
        return logits.astype(jnp.float32)
