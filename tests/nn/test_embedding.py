"""The tied un-embedding: ``tied_logits``'s reordered table gradient against plain math."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.nn.embedding import Embedding, tied_logits


def test_tied_logits_values_and_gradients_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 8)).astype(np.float32)
    table = rng.normal(size=(20, 8)).astype(np.float32)
    g = rng.normal(size=(12, 20)).astype(np.float32)  # an arbitrary upstream gradient

    def contract(xx, tt):
        return jnp.sum(tied_logits(xx, tt) * g)

    logits = tied_logits(jnp.asarray(x), jnp.asarray(table))
    dx, dtable = jax.jit(jax.grad(contract, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(table))
    x64, t64, g64 = x.astype(np.float64), table.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(np.asarray(logits), x64 @ t64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx), g64 @ t64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dtable), g64.T @ x64, rtol=1e-5, atol=1e-5)
    assert dtable.shape == table.shape


def test_attend_equals_the_plain_einsum_with_gradients():
    emb = Embedding(16, 4, init_std=1.0, dtype=jnp.float32, param_dtype=jnp.float32,
                    rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(emb)
    x = jax.random.normal(jax.random.key(1), (2, 3, 4))

    def ours(p, xx):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, p).attend(xx)))

    def plain(t, xx):
        return jnp.sum(jnp.sin(jnp.einsum("BTD,VD->BTV", xx, t)))

    g_params, g_x = jax.grad(ours, argnums=(0, 1))(params, x)
    want = jax.grad(plain, argnums=(0, 1))(emb.table[...], x)
    for a, b in zip((g_params["table"][...], g_x), want, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_few_tokens_read_the_table_as_it_lies():
    """With fewer tokens than the width (decoding), the logits are (table·xᵀ)ᵀ: the same
    values and gradients, and a jitted decoding-like loop no longer copies the [V, D] table
    into a transposed [D, V] layout at every iteration."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 64)).astype(np.float32)  # M = 1 token < D = 64
    table = rng.normal(size=(256, 64)).astype(np.float32)
    g = rng.normal(size=(1, 256)).astype(np.float32)
    x64, t64, g64 = x.astype(np.float64), table.astype(np.float64), g.astype(np.float64)
    np.testing.assert_allclose(np.asarray(jax.jit(tied_logits)(x, table)), x64 @ t64.T,
                               rtol=1e-5, atol=1e-4)
    dx, dtable = jax.grad(lambda a, b: jnp.sum(tied_logits(a, b) * g), argnums=(0, 1))(x, table)
    np.testing.assert_allclose(np.asarray(dx), g64 @ t64, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(np.asarray(dtable), g64.T @ x64, rtol=1e-5, atol=1e-4)

    def loop(t, xx):
        def body(_, c):
            return c + tied_logits(c, t)[:, :64] * 1e-3
        return jax.lax.fori_loop(0, 4, body, xx)

    hlo = jax.jit(loop).lower(table, x).compile().as_text()
    copies = [line for line in hlo.splitlines() if " copy(" in line and "f32[64,256]" in line]
    assert not copies, copies
