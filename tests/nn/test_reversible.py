"""Reversible residual stacks against the plain composition of the same layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.nn.reversible import reversible_inverse, reversible_stack


def mlp(p, x):
    """A small tanh MLP: x [R, D] -> [R, D]."""
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"]


def _params(rng, n_layers, d, hidden, scale=0.5):
    """Stacked MLP parameters, leading layer axis L (numpy draws: no PRNG kernel to compile)."""
    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return {"w1": scale * normal(n_layers, d, hidden) / np.sqrt(d),
            "b1": 0.1 * normal(n_layers, hidden),
            "w2": scale * normal(n_layers, hidden, d) / np.sqrt(hidden)}


def _setup(n_layers, rows, d, hidden):
    rng = np.random.default_rng(0)
    return (_params(rng, n_layers, d, hidden), _params(rng, n_layers, d, hidden),
            jnp.asarray(rng.standard_normal((rows, d)), jnp.float32),
            jnp.asarray(rng.standard_normal((rows, d)), jnp.float32))


def plain_stack(params_f, params_g, x1, x2):
    """The same layers as an unrolled Python loop, differentiated by plain jax.grad."""
    for layer in range(params_f["w1"].shape[0]):
        p_f = jax.tree.map(lambda a, i=layer: a[i], params_f)
        p_g = jax.tree.map(lambda a, i=layer: a[i], params_g)
        x1 = x1 + mlp(p_f, x2)
        x2 = x2 + mlp(p_g, x1)
    return x1, x2


def _loss(stack):
    def loss(params_f, params_g, x1, x2):
        y1, y2 = stack(params_f, params_g, x1, x2)
        # Different weights on the two halves, so a swapped or dropped cotangent shows.
        return jnp.sum(jnp.sin(y1)) + 0.5 * jnp.sum(y2 ** 2)
    return loss


def _reversible(params_f, params_g, x1, x2):
    return reversible_stack(mlp, mlp, params_f, params_g, x1, x2)


def test_forward_matches_plain_and_inverse_reconstructs_inputs():
    params_f, params_g, x1, x2 = _setup(n_layers=6, rows=16, d=8, hidden=16)
    y1, y2 = jax.jit(_reversible)(params_f, params_g, x1, x2)
    want1, want2 = plain_stack(params_f, params_g, x1, x2)
    np.testing.assert_allclose(y1, want1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y2, want2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(y1, x1) and not np.allclose(y2, x2)  # the layers do something
    r1, r2 = jax.jit(lambda *a: reversible_inverse(mlp, mlp, *a))(params_f, params_g, y1, y2)
    np.testing.assert_allclose(r1, x1, rtol=1e-5, atol=1e-5 * float(jnp.abs(x1).max()))
    np.testing.assert_allclose(r2, x2, rtol=1e-5, atol=1e-5 * float(jnp.abs(x2).max()))


def test_gradients_equal_plain_composition():
    params_f, params_g, x1, x2 = _setup(n_layers=6, rows=16, d=8, hidden=16)
    grad_rev = jax.jit(jax.grad(_loss(_reversible), argnums=(0, 1, 2, 3)))
    grad_plain = jax.jit(jax.grad(_loss(plain_stack), argnums=(0, 1, 2, 3)))
    got, want = grad_rev(params_f, params_g, x1, x2), grad_plain(params_f, params_g, x1, x2)
    leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
    assert jax.tree.structure(got) == jax.tree.structure(want) and len(leaves_got) == 8
    for g, w in zip(leaves_got, leaves_want, strict=True):
        w = np.asarray(w)
        assert np.any(w != 0)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * np.abs(w).max())


def _grad_temp_bytes(stack, n_layers, rows=512, d=128):
    args = _setup(n_layers, rows, d, hidden=d)
    compiled = jax.jit(jax.grad(_loss(stack), argnums=(0, 1, 2, 3))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_activation_memory_does_not_grow_with_depth():
    rev = {n: _grad_temp_bytes(_reversible, n) for n in (4, 16)}
    plain = {n: _grad_temp_bytes(plain_stack, n) for n in (4, 16)}
    print(f"temp bytes of jit(grad(loss)): reversible {rev}, plain {plain}")
    plain_growth, rev_growth = plain[16] - plain[4], rev[16] - rev[4]
    # 12 more plain layers keep at least 12 x 2 activations of [512, 128] float32 (256 KiB).
    assert plain_growth >= 12 * 2 * 512 * 128 * 4
    assert rev_growth < plain_growth / 4
