"""Block-sparse (Longformer / BigBird) attention against the dense reference with a dense mask."""

from __future__ import annotations

import functools

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.nn.attention_kernels import reference_attention
from jaxformer.nn.block_sparse import (
    _sparse_rows,
    bigbird_attention,
    block_sparse_attention,
    block_sparse_layout,
    longformer_attention,
)

B, N, K, H = 2, 4, 2, 8  # grouped-query: two query heads per key/value head
T, BLOCK = 32, 4  # nb = 8 blocks
# The BigBird configuration the equality, leak and gradient tests share (one compile each).
LAYOUT = dict(window=1, n_global=1, n_random=1, seed=3)
BIGBIRD = dict(block=BLOCK, **LAYOUT)


def _qkv(t: int = T, seed: int = 0):
    # numpy, not jax.random: eager jax.random compiles once per shape, numpy costs nothing.
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal(shape), jnp.float32)
                 for shape in ((B, t, N, H), (B, t, K, H), (B, t, K, H)))


@functools.cache
def _jit_cached(fn, static: tuple):
    return jax.jit(functools.partial(fn, **dict(static)))


def _jit(fn, **static):
    """fn with its static keyword arguments bound, jitted and reused across tests: one compile
    per configuration instead of one per operation (the file's time is mostly compiling)."""
    return _jit_cached(fn, tuple(sorted(static.items())))


# One jitted reference for every dense comparison: the mask is an argument, not a constant.
_reference = jax.jit(reference_attention)


def _dense_mask(layout: np.ndarray, block: int, is_causal: bool) -> jnp.ndarray:
    """The layout expanded to tokens (plus the causal triangle) -> [1, 1, T, S]."""
    dense = np.kron(layout, np.ones((block, block))).astype(bool)
    if is_causal:
        dense &= np.tril(np.ones_like(dense))
    return jnp.asarray(dense[None, None])


def _segments(t: int) -> jnp.ndarray:
    """Two packed documents per row, split at different places in each row."""
    pos = np.arange(t)
    return jnp.asarray(np.stack([1 + (pos >= t // 3), 1 + (pos >= t - 5)]).astype(np.int32))


@pytest.mark.parametrize("is_causal", [False, True])
def test_every_block_kept_equals_dense(is_causal):
    q, k, v = _qkv()
    got = _jit(block_sparse_attention, block=8, window=4, n_global=1, is_causal=is_causal)(
        q, k, v)
    full = np.ones((1, 1, T, T), bool)
    want = _reference(q, k, v, mask=np.tril(full) if is_causal else full, segment_ids=None)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("is_causal", "with_segments"),
                         [(False, False), (True, False), (False, True), (True, True)])
def test_bigbird_equals_dense_masked_reference(is_causal, with_segments):
    q, k, v = _qkv(seed=1)
    layout = block_sparse_layout(T // BLOCK, is_causal=is_causal, **LAYOUT)
    assert not layout.all()  # the check below must be about a sparse pattern
    seg = _segments(T) if with_segments else None
    got = _jit(bigbird_attention, is_causal=is_causal, **BIGBIRD)(q, k, v, segment_ids=seg)
    want = _reference(q, k, v, mask=_dense_mask(layout, BLOCK, is_causal), segment_ids=seg)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_layout_structure():
    nb = 8
    layout = block_sparse_layout(nb, window=1, n_global=1, n_random=2, seed=0)
    assert layout[0].all() and layout[:, 0].all()  # global row and column
    assert all(layout[i, j] for i in range(nb) for j in range(nb) if abs(i - j) <= 1)
    # Each non-global row: its window + the global block + exactly 2 random extras.
    base = block_sparse_layout(nb, window=1, n_global=1, n_random=0)
    np.testing.assert_array_equal((layout & ~base)[1:].sum(axis=1), 2)
    causal = block_sparse_layout(nb, window=1, n_global=1, n_random=2, seed=0, is_causal=True)
    assert not np.triu(causal, 1).any()
    assert np.diag(causal).all()


def test_causal_leaks_no_future_token():
    j = 19
    q, k, v = _qkv(seed=2)
    fn = _jit(bigbird_attention, is_causal=True, **BIGBIRD)
    base = fn(q, k, v, segment_ids=None)
    bump = np.zeros(k.shape, np.float32)
    bump[:, j] = 5.0  # numpy, so the perturbation compiles nothing
    moved = fn(q, k + bump, v + bump, segment_ids=None)
    np.testing.assert_array_equal(base[:, :j], moved[:, :j])
    assert not np.allclose(base[:, j], moved[:, j])  # the perturbation does reach position j


def test_gradients_match_dense_masked_reference():
    q, k, v = _qkv(seed=4)
    layout = block_sparse_layout(T // BLOCK, is_causal=True, **LAYOUT)
    mask = _dense_mask(layout, BLOCK, True)

    @jax.jit
    def both_grads(q, k, v):
        sparse = functools.partial(bigbird_attention, is_causal=True, **BIGBIRD)
        dense = functools.partial(reference_attention, mask=mask)
        loss = lambda fn: lambda *qkv: jnp.sum(jnp.sin(fn(*qkv)))  # noqa: E731
        return (jax.grad(loss(sparse), argnums=(0, 1, 2))(q, k, v),
                jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v))

    got, want = both_grads(q, k, v)
    for g, w in zip(got, want, strict=True):
        assert np.isfinite(g).all()
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=1e-4)


def _largest_intermediate(jaxpr) -> int:
    """Elements of the biggest array any equation (nested jaxprs included) produces."""
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            biggest = max(biggest, _largest_intermediate(sub))
    return biggest


def test_no_dense_scores_intermediate():
    t = 128
    q, k, v = _qkv(t)
    dense_size = B * N * t * t
    sparse = jax.make_jaxpr(functools.partial(longformer_attention, block=8, window=1,
                                              n_global=1))(q, k, v)
    dense = jax.make_jaxpr(reference_attention)(q, k, v)
    assert _largest_intermediate(dense.jaxpr) >= dense_size  # the check can fail
    assert _largest_intermediate(sparse.jaxpr) < dense_size


def test_hidden_everything_row_is_uniform_not_nan():
    # Real layouts always keep the diagonal (a token sees itself), so drive the block kernel
    # directly with one query block whose every gathered key block is masked padding.
    block, t = 4, 16
    q, k, v = _qkv(t, seed=6)
    idx = np.array([[0, 1], [1, 2], [3, 0]], np.int32)
    valid = np.array([[True, True], [True, True], [False, False]])
    out = jax.jit(functools.partial(_sparse_rows, idx=idx, valid=valid, block=block, first=1,
                                    is_causal=False, scale=H**-0.5, segment_ids=None))(q, k, v)
    assert np.isfinite(out).all()
    # Last query block: uniform over its 2*block gathered (hidden) keys, blocks 3 and 0.
    keys = np.concatenate([v[:, 12:16], v[:, 0:4]], axis=1)  # [B, 8, K, H]
    want = np.repeat(keys.mean(axis=1), N // K, axis=1)  # [B, N, H]
    np.testing.assert_allclose(out[:, 8:], np.broadcast_to(want[:, None], out[:, 8:].shape),
                               atol=1e-5)


@pytest.mark.parametrize(("kwargs", "name"), [
    (dict(block=5, window=1, n_global=1), "block"),
    (dict(block=8, window=1, n_global=3), "n_global"),
    (dict(block=8, window=-1, n_global=1), "window"),
    (dict(block=8, window=1, n_global=1, n_random=-1), "n_random"),
])
def test_invalid_arguments_raise(kwargs, name):
    q, k, v = _qkv(16)
    with pytest.raises(ValueError, match=name):
        block_sparse_attention(q, k, v, **kwargs)
