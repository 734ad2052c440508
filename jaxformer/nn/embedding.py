"""Token embedding with a tied un-embedding (``attend``).

Letters: B batch, T length, D model width, V vocabulary, M = B·T tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.params import normal_param
from jaxformer.parallel.target import target_platform


@jax.custom_vjp
def tied_logits(x: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """x: [M, D], table: [V, D] -> logits x·tableᵀ [M, V].

    Same values and gradients as ``x @ table.T``; only the table's gradient is computed in
    another order. Its natural form, ``gᵀ·x`` with g the [M, V] logit gradient, contracts the
    token axis of two token-major operands, and XLA's CPU matmuls (YNNPACK) take it by first
    copying g into a transposed [V, M] layout (V·M elements, the step's largest array). Here it
    is ``(xᵀ·g)ᵀ`` instead: x is transposed (M·D elements, V/D times fewer), the matmul is in
    the fast row-major form, and the [D, V] result is transposed back.

    The logits themselves, ``x·tableᵀ`` for one token, made XLA's CPU matmul copy the whole
    table into a [D, V] layout first, inside the loop: a batch-1 decoding loop wrote and read
    V·D elements at every token to produce V. With fewer tokens than D they are
    ``(table·xᵀ)ᵀ`` instead: the table is read as it lies, and only the [V, M] result is
    transposed (M·V elements, D/M times fewer).
    """
    return _logits(x, table)


def _logits(x: jnp.ndarray, table: jnp.ndarray) -> jnp.ndarray:
    """x [M, D], table [V, D] -> x·tableᵀ [M, V], in the cheaper order for M (see above)."""
    if x.shape[0] >= table.shape[1]:  # training: M = batch x length tokens
        return x @ table.T
    # the barrier keeps XLA from folding the transposes back into x·tableᵀ
    return jax.lax.optimization_barrier(table @ x.T).T


def _tied_logits_fwd(x, table):
    return _logits(x, table), (x, table)


def _tied_logits_bwd(residuals, g):
    x, table = residuals
    # the barriers keep XLA from folding either transpose back into the matmul, which would
    # undo the reordering (see tied_logits)
    x_t = jax.lax.optimization_barrier(x.T)
    return g @ table, jax.lax.optimization_barrier(x_t @ g).T


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


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
        """Tied un-embedding. x: [B, T, D] -> logits [B, T, V] in float32.

        On CPU through ``tied_logits`` (faster orders of the table's gradient, and of the
        logits of a few tokens, for XLA's CPU matmuls); elsewhere the plain einsum, whose
        transposes GPU/TPU matmuls absorb.
        """
        table = self.table[...].astype(self.dtype)
        x = x.astype(self.dtype)
        if target_platform() == "cpu":
            b, t, d = x.shape
            return tied_logits(x.reshape(b * t, d), table).reshape(b, t, -1).astype(jnp.float32)
        return jnp.einsum("BTD,VD->BTV", x, table).astype(jnp.float32)
