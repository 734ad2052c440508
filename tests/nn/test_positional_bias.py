"""Attention biases (ALiBi, T5 buckets, Shaw clipped offsets) against the papers' reference code,
against transformers (BLOOM, T5; torch CPU) and against their structure (Toeplitz, clipping,
which table rows a gradient reaches)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxformer.nn.positional import (
    ShawRelativeBias,
    T5RelativeBias,
    alibi_bias,
    alibi_slopes,
    relative_position_bucket,
)


def packed_positions(t: int) -> np.ndarray:
    """Row 0: one document 0..t-1; row 1: two packed documents, each restarting at 0."""
    return np.stack([np.arange(t), np.r_[np.arange(t // 2), np.arange(t - t // 2)]])


# ---------------------------------------------------------------------------------------------
# ALiBi


def reference_alibi_slopes(n: int) -> list[float]:
    """ofirpress/attention_with_linear_biases, fairseq/models/transformer.py ``get_slopes``."""

    def get_slopes_power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        ratio = start
        return [start * ratio**i for i in range(n)]

    if math.log2(n).is_integer():
        return get_slopes_power_of_2(n)
    closest_power_of_2 = 2 ** math.floor(math.log2(n))
    return (get_slopes_power_of_2(closest_power_of_2)
            + reference_alibi_slopes(2 * closest_power_of_2)[0::2][: n - closest_power_of_2])


def test_alibi_slopes_for_eight_heads_are_the_papers():
    np.testing.assert_array_equal(alibi_slopes(8), [2.0**-k for k in range(1, 9)])


@pytest.mark.parametrize("n", [1, 2, 3, 5, 6, 12, 16, 24, 40, 71, 96])
def test_alibi_slopes_match_reference_code_and_bloom(n):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    got = alibi_slopes(n)
    assert got.shape == (n,) and got.dtype == np.float32
    np.testing.assert_allclose(got, reference_alibi_slopes(n), rtol=1e-6)
    np.testing.assert_allclose(got, _get_alibi_slopes(n, torch.device("cpu")).numpy(),
                               rtol=1e-6)


def test_alibi_bias_is_slope_times_key_minus_query():
    t, n = 7, 12
    slopes = alibi_slopes(n)
    pos = np.arange(t)[None]
    got = np.asarray(alibi_bias(jnp.asarray(slopes), jnp.asarray(pos), jnp.asarray(pos)))
    assert got.shape == (1, n, t, t) and got.dtype == np.float32
    for h in range(n):
        for i in range(t):
            for j in range(t):
                assert got[0, h, i, j] == (j - i) * slopes[h]
    assert np.all(np.diagonal(got, axis1=-2, axis2=-1) == 0)
    assert np.all(got[0][:, np.tril_indices(t, -1)[0], np.tril_indices(t, -1)[1]] < 0)


def test_alibi_bias_with_packed_and_decode_positions():
    # Packed rows restart at 0; a decode step's queries sit after the cached keys (T != S).
    slopes = alibi_slopes(4)
    k_pos = packed_positions(10)  # [B, S]
    q_pos = np.array([[8, 9], [3, 4]])  # [B, T]
    got = np.asarray(alibi_bias(jnp.asarray(slopes), jnp.asarray(q_pos), jnp.asarray(k_pos)))
    want = slopes[None, :, None, None] * (k_pos[:, None, None, :] - q_pos[:, None, :, None])
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_alibi_softmax_matches_bloom():
    # BLOOM adds slope * key index (no query term); rows differ by a constant, so the causal
    # softmax is the same.
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    t, n = 9, 6
    pos = np.arange(t)[None]
    ours = np.asarray(alibi_bias(jnp.asarray(alibi_slopes(n)), jnp.asarray(pos),
                                 jnp.asarray(pos)))[0]  # [N, T, S]
    bloom = build_alibi_tensor(torch.ones(1, t), n, torch.float32).numpy()  # [N, 1, S]
    causal = np.tril(np.ones((t, t), bool))
    scores = np.random.default_rng(0).normal(size=(n, t, t))

    def softmax(x):
        x = np.where(causal, x, -np.inf)
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    np.testing.assert_allclose(softmax(scores + ours), softmax(scores + bloom), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# T5 buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("num_buckets, max_distance", [(32, 128), (16, 64), (64, 300)])
def test_t5_buckets_match_transformers(bidirectional, num_buckets, max_distance):
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-300, 301)
    want = T5Attention._relative_position_bucket(
        torch.from_numpy(rel), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance).numpy()
    got = np.asarray(relative_position_bucket(jnp.asarray(rel), bidirectional=bidirectional,
                                              num_buckets=num_buckets,
                                              max_distance=max_distance))
    np.testing.assert_array_equal(got, want)
    # Structure, independently of the reference: small offsets get a bucket each, and every
    # bucket is used except, bidirectionally, the first "after" one (an offset of +0 is "before").
    unused = {num_buckets // 2} if bidirectional else set()
    assert set(got.tolist()) == set(range(num_buckets)) - unused
    if not bidirectional:
        assert np.all(got[rel >= 0] == 0)
    exact = num_buckets // 4 if bidirectional else num_buckets // 2
    np.testing.assert_array_equal(got[300 - exact + 1: 301], np.arange(exact)[::-1])


def make_t5_bias(bidirectional: bool, n_heads: int = 4) -> T5RelativeBias:
    return T5RelativeBias(n_heads, bidirectional=bidirectional, init_std=1.0,
                          param_dtype=jnp.float32, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("bidirectional", [True, False])
def test_t5_bias_is_a_gather_of_the_table_by_bucket(bidirectional):
    from transformers.models.t5.modeling_t5 import T5Attention

    module = make_t5_bias(bidirectional)
    assert module.embedding.shape == (32, 4)
    assert module.embedding.get_metadata()["logical_axes"] == (None, "heads")
    q_pos = packed_positions(6) * 40  # far apart, so the log buckets are used too
    k_pos = packed_positions(8) * 40
    got = np.asarray(module(jnp.asarray(q_pos), jnp.asarray(k_pos)))
    assert got.shape == (2, 4, 6, 8) and got.dtype == np.float32
    rel = k_pos[:, None, :] - q_pos[:, :, None]  # [B, T, S], memory - query as in T5
    buckets = T5Attention._relative_position_bucket(torch.from_numpy(rel),
                                                    bidirectional=bidirectional).numpy()
    table = np.asarray(module.embedding[...])
    np.testing.assert_array_equal(got, table[buckets].transpose(0, 3, 1, 2))


@pytest.mark.parametrize("is_decoder", [False, True])
def test_t5_bias_matches_transformers_compute_bias(is_decoder):
    from transformers import T5Config
    from transformers.models.t5.modeling_t5 import T5Attention

    n, t, s, past = 4, 5, 9, 4
    config = T5Config(d_model=16, d_kv=4, num_heads=n, is_decoder=is_decoder)
    ref = T5Attention(config, has_relative_attention_bias=True, layer_idx=0)
    module = make_t5_bias(bidirectional=not is_decoder, n_heads=n)
    with torch.no_grad():
        ref.relative_attention_bias.weight.copy_(torch.tensor(np.asarray(module.embedding[...])))
        want = ref.compute_bias(t, s, past_seen_tokens=past).numpy()  # [1, N, T, S]
    got = module(jnp.asarray(past + np.arange(t))[None], jnp.arange(s)[None])
    np.testing.assert_array_equal(np.asarray(got), want)


# ---------------------------------------------------------------------------------------------
# Shaw clipped offsets


def make_shaw(max_distance: int, n_heads: int = 3) -> ShawRelativeBias:
    return ShawRelativeBias(n_heads, max_distance=max_distance, init_std=1.0,
                            param_dtype=jnp.float32, rngs=nnx.Rngs(1))


def test_shaw_bias_is_toeplitz_and_clipped():
    m, t = 3, 10
    module = make_shaw(m)
    assert module.table.shape == (2 * m + 1, 3)
    assert module.table.get_metadata()["logical_axes"] == (None, "heads")
    pos = jnp.arange(t)[None]
    got = np.asarray(module(pos, pos))[0]  # [N, T, S]
    table = np.asarray(module.table[...])
    np.testing.assert_array_equal(got[:, 1:, 1:], got[:, :-1, :-1])  # constant diagonals
    for i in range(t):
        for j in range(t):
            np.testing.assert_array_equal(got[:, i, j], table[min(max(j - i, -m), m) + m])
    # Beyond max_distance every offset shares the end rows, and the rows differ from each other.
    far_past = got[:, np.tril_indices(t, -m)[0], np.tril_indices(t, -m)[1]]
    far_future = got[:, np.triu_indices(t, m)[0], np.triu_indices(t, m)[1]]
    np.testing.assert_array_equal(far_past, np.broadcast_to(table[0][:, None], far_past.shape))
    np.testing.assert_array_equal(far_future,
                                  np.broadcast_to(table[-1][:, None], far_future.shape))
    assert len({tuple(r) for r in table}) == 2 * m + 1


def test_shaw_bias_with_packed_positions():
    module = make_shaw(4)
    q_pos, k_pos = packed_positions(6), packed_positions(11)
    got = np.asarray(module(jnp.asarray(q_pos), jnp.asarray(k_pos)))
    rows = np.clip(k_pos[:, None, :] - q_pos[:, :, None], -4, 4) + 4
    np.testing.assert_array_equal(got, np.asarray(module.table[...])[rows].transpose(0, 3, 1, 2))


def shaw_table_grad(module: ShawRelativeBias, t: int, weights: jnp.ndarray) -> np.ndarray:
    """d/d table of sum(bias * weights) for positions 0..t-1."""
    graphdef, params = nnx.split(module)
    pos = jnp.arange(t)[None]

    def loss_fn(params):
        return jnp.sum(nnx.merge(graphdef, params)(pos, pos) * weights)

    return np.asarray(jax.grad(loss_fn)(params)["table"][...])


def test_shaw_gradient_reaches_only_the_used_rows():
    m, t = 10, 4  # offsets -3..3 only: rows 7..13 of 21
    weights = jax.random.normal(jax.random.key(2), (1, 3, t, t))
    w = np.asarray(weights)[0]  # [N, T, S]
    grad = shaw_table_grad(make_shaw(m), t, weights)
    want = np.zeros((2 * m + 1, 3))
    for i in range(t):
        for j in range(t):
            want[j - i + m] += w[:, i, j]
    np.testing.assert_allclose(grad, want, atol=1e-6)
    assert np.all(grad[: m - t + 1] == 0) and np.all(grad[m + t:] == 0)
    assert np.all(grad[m - t + 1: m + t] != 0)

    # With clipping (max_distance 1), the end rows collect every offset beyond it.
    grad = shaw_table_grad(make_shaw(1), t, weights)
    ones = np.ones((t, t))
    np.testing.assert_allclose(grad[0], (w * np.tril(ones, -1)).sum((1, 2)), atol=1e-6)
    np.testing.assert_allclose(grad[1], (w * np.eye(t)).sum((1, 2)), atol=1e-6)
    np.testing.assert_allclose(grad[2], (w * np.triu(ones, 1)).sum((1, 2)), atol=1e-6)
