"""Norms against naive numpy written here, against PyTorch / transformers, and their properties."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxformer.nn.norms import LayerNorm, RMSNorm, ScaleNorm, make_norm

D = 24


def _inputs(dtype: jnp.dtype, seed: int = 0) -> tuple[jnp.ndarray, np.ndarray]:
    """Random [3, 5, D] with an offset mean and one all-zero (padding) row.

    Returns the array in ``dtype`` and the same values (after rounding to ``dtype``) in float64,
    so the reference sees exactly the input the layer sees.
    """
    x = np.random.default_rng(seed).normal(size=(3, 5, D)) * 3 + 1.5
    x[1, 2] = 0.0
    xj = jnp.asarray(x, dtype)
    return xj, np.asarray(xj.astype(jnp.float32), np.float64)


def _random_params(module: nnx.Module, seed: int = 1) -> None:
    """Replace every param with random values, so scale/bias mistakes cannot hide behind 1 and 0."""
    rng = np.random.default_rng(seed)
    for _, p in nnx.iter_graph(module):
        if isinstance(p, nnx.Param):
            p[...] = jnp.asarray(rng.normal(size=p.shape) + 1.0, p.dtype)


def _p(param: nnx.Param) -> np.ndarray:
    return np.asarray(param[...].astype(jnp.float32), np.float64)


def _naive_layernorm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps) * scale
    return y if bias is None else y + bias


def _naive_rmsnorm(x, scale, eps):
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * scale


def _naive_scalenorm(x, g, eps):
    return g * x / np.maximum(np.sqrt((x**2).sum(-1, keepdims=True)), eps)


# bfloat16 has an 8-bit mantissa: the output is the float32 result rounded once, so its
# relative error is at most 2^-8; the absolute slack covers values near zero.
TOL = {jnp.float32: dict(rtol=1e-5, atol=1e-5), jnp.bfloat16: dict(rtol=8e-3, atol=1e-2)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("use_bias", [True, False])
def test_layernorm_matches_naive_math(dtype, use_bias):
    x, x64 = _inputs(dtype)
    ln = LayerNorm(D, eps=1e-5, use_bias=use_bias)
    _random_params(ln)
    got = ln(x)
    assert got.dtype == dtype
    want = _naive_layernorm(x64, _p(ln.scale), _p(ln.bias) if use_bias else None, 1e-5)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rmsnorm_matches_naive_math(dtype):
    x, x64 = _inputs(dtype)
    norm = RMSNorm(D, eps=1e-6)
    _random_params(norm)
    got = norm(x)
    assert got.dtype == dtype
    want = _naive_rmsnorm(x64, _p(norm.scale), 1e-6)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, **TOL[dtype])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_scalenorm_matches_naive_math(dtype):
    x, x64 = _inputs(dtype)
    norm = ScaleNorm(D, eps=1e-5)
    np.testing.assert_allclose(float(norm.scale[...]), np.sqrt(D), rtol=1e-6)  # paper's init
    norm.scale[...] = jnp.asarray(2.7)
    got = norm(x)
    assert got.dtype == dtype
    want = _naive_scalenorm(x64, 2.7, 1e-5)
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, **TOL[dtype])


def test_scalenorm_eps_clamps_tiny_vectors():
    # ||x|| = 1e-7 < eps = 1e-5: the denominator is eps, not the norm.
    x = np.zeros((1, D))
    x[0, 0] = 1e-7
    norm = ScaleNorm(D, eps=1e-5)
    got = np.asarray(norm(jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got[0, 0], np.sqrt(D) * 1e-7 / 1e-5, rtol=1e-5)


@pytest.mark.parametrize("c", [1e-3, 0.5, 7.0, 1e3])
def test_scalenorm_is_scale_invariant(c):
    x, _ = _inputs(jnp.float32, seed=3)
    x = x.at[1, 2].set(1.0)  # no zero row: the eps clamp is the one place invariance breaks
    norm = ScaleNorm(D)
    np.testing.assert_allclose(np.asarray(norm(c * x)), np.asarray(norm(x)), rtol=1e-5,
                               atol=1e-6)
    # and it is not a no-op: the output norm is g, whatever the input norm
    np.testing.assert_allclose(np.linalg.norm(np.asarray(norm(c * x)), axis=-1), np.sqrt(D),
                               rtol=1e-5)


@pytest.mark.parametrize("kind", ["layernorm", "rmsnorm", "scalenorm"])
def test_padding_rows_give_finite_values_and_gradients(kind):
    x, _ = _inputs(jnp.float32)  # row [1, 2] is all zeros
    norm = make_norm(kind, D, eps=1e-5)
    _random_params(norm)
    graphdef, state = nnx.split(norm)

    def loss(state, x):
        return (nnx.merge(graphdef, state)(x) ** 2).sum()

    g_state, g_x = jax.grad(loss, argnums=(0, 1))(state, x)
    assert np.isfinite(np.asarray(nnx.merge(graphdef, state)(x))).all()
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(g_state))
    assert np.isfinite(np.asarray(g_x)).all()


@pytest.mark.parametrize("use_bias", [True, False])
def test_layernorm_matches_torch(use_bias):
    x, x64 = _inputs(jnp.float32, seed=5)
    ln = LayerNorm(D, eps=1e-5, use_bias=use_bias)
    _random_params(ln)
    ref = torch.nn.LayerNorm(D, eps=1e-5, bias=use_bias, dtype=torch.float64)
    with torch.no_grad():
        ref.weight.copy_(torch.from_numpy(_p(ln.scale)))
        if use_bias:
            ref.bias.copy_(torch.from_numpy(_p(ln.bias)))
        want = ref(torch.from_numpy(x64)).numpy()
    np.testing.assert_allclose(np.asarray(ln(x)), want, rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_llama_and_t5():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    x, x64 = _inputs(jnp.float32, seed=6)
    norm = RMSNorm(D, eps=1e-6)
    _random_params(norm)
    got = np.asarray(norm(x))
    for ref in (LlamaRMSNorm(D, eps=1e-6), T5LayerNorm(D, eps=1e-6)):
        with torch.no_grad():
            ref.weight.copy_(torch.from_numpy(_p(norm.scale)).float())
            want = ref(torch.from_numpy(x64).float()).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=type(ref).__name__)


def test_params_and_logical_axes():
    def params(m):
        return {k[-1]: (v.shape, v.get_metadata()["logical_axes"])
                for k, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}

    assert params(LayerNorm(D)) == {"scale": ((D,), ("embed",)), "bias": ((D,), ("embed",))}
    assert params(LayerNorm(D, use_bias=False)) == {"scale": ((D,), ("embed",))}
    assert params(RMSNorm(D)) == {"scale": ((D,), ("embed",))}
    assert params(ScaleNorm(D)) == {"scale": ((), ())}
    ln = LayerNorm(D, param_dtype=jnp.bfloat16)
    assert ln.scale[...].dtype == jnp.bfloat16
    assert ln(jnp.ones((2, D), jnp.float32)).dtype == jnp.float32  # input dtype, not param dtype


def test_make_norm_builds_each_kind_with_its_eps():
    ln = make_norm("layernorm", D, eps=1e-3, use_bias=False, param_dtype=jnp.bfloat16)
    assert type(ln) is LayerNorm and ln.eps == 1e-3 and ln.bias is None
    assert ln.scale[...].dtype == jnp.bfloat16
    rms = make_norm("rmsnorm", D, eps=1e-4)
    assert type(rms) is RMSNorm and rms.eps == 1e-4
    sn = make_norm("scalenorm", D, eps=1e-2)
    assert type(sn) is ScaleNorm and sn.eps == 1e-2


def test_make_norm_rejects_unknown_kind_naming_the_valid_ones():
    with pytest.raises(ValueError, match="'batchnorm'") as err:
        make_norm("batchnorm", D, eps=1e-5)
    for kind in ("layernorm", "rmsnorm", "scalenorm"):
        assert kind in str(err.value)
