from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxformer.nn.norms import LayerNorm


def test_layernorm_matches_formula_and_keeps_dtype():
    x = np.random.default_rng(0).normal(size=(3, 5, 8)) * 4 + 2
    ln = LayerNorm(8, eps=1e-5)
    ln.scale[...] = jnp.arange(8.0)
    ln.bias[...] = jnp.ones(8)
    want = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    want = want * np.arange(8.0) + 1
    np.testing.assert_allclose(np.asarray(ln(jnp.asarray(x, jnp.float32))), want, atol=1e-4)
    assert ln(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
