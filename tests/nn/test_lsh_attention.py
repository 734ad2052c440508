"""Reformer LSH attention against naive float64 numpy shared-QK attention."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.nn.lsh_attention import lsh_attention, random_rotations


def _inputs(b=2, t=16, n=2, h=8, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((b, t, n, h)).astype(np.float32),
            rng.standard_normal((b, t, n, h)).astype(np.float32))


def naive_shared_qk(qk, v, visible, scale):
    """Softmax attention in float64 over the keys ``visible[b, n, i]`` (a set per query), keys
    the unit-length qk rows, self score -1e5 (so a token sees itself only when alone)."""
    qk, v = np.asarray(qk, np.float64), np.asarray(v, np.float64)
    b, t, n, h = qk.shape
    k = qk / np.linalg.norm(qk, axis=-1, keepdims=True)
    out = np.zeros_like(qk)
    for bi in range(b):
        for ni in range(n):
            for i in range(t):
                keys = sorted(visible[bi][ni][i])
                s = np.array([-1e5 if j == i else scale * qk[bi, i, ni] @ k[bi, j, ni]
                              for j in keys])
                w = np.exp(s - s.max())
                out[bi, i, ni] = (w / w.sum()) @ v[bi, keys, ni]
    return out


def _all_keys(b, n, t, is_causal):
    return [[[set(range(i + 1)) if is_causal else set(range(t)) for i in range(t)]
             for _ in range(n)] for _ in range(b)]


# Few distinct configurations, shared by the tests: every (shape, n_hashes, n_buckets, chunk,
# causal) compiles anew, and compiling dominates the run time on CPU.
N, H = 2, 8


@pytest.mark.parametrize(("n_hashes", "is_causal"), [(1, False), (1, True), (3, False), (3, True)])
def test_one_chunk_equals_full_attention(n_hashes, is_causal):
    # chunk == T: every round's chunk holds every position, so LSH sees all keys; with three
    # rounds each key is listed six times (3 rounds x look-back) and must still count once.
    qk, v = _inputs(b=2, t=16, n=N, h=H)
    out = lsh_attention(jnp.asarray(qk), jnp.asarray(v), n_hashes=n_hashes, n_buckets=4,
                        chunk=16, key=jax.random.key(1), is_causal=is_causal)
    want = naive_shared_qk(qk, v, _all_keys(2, N, 16, is_causal), H ** -0.5)
    assert out.shape == qk.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)


def _lsh_visible(qk, rotations, chunk, is_causal):
    """Keys each query meets in any round, by the paper's recipe written out with loops."""
    b, t, n, _ = qk.shape
    n_hashes = rotations.shape[1]
    visible = []
    for bi in range(b):
        rows = []
        for ni in range(n):
            order = []  # (round, position) in sorted order, rounds one after the other
            for r in range(n_hashes):
                x = qk[bi, :, ni] @ rotations[ni, r]
                buckets = np.argmax(np.concatenate([x, -x], axis=-1), axis=-1)
                order += [(r, p) for p in sorted(range(t), key=lambda p: (buckets[p], p))]
            chunks = [[p for _, p in order[c:c + chunk]] for c in range(0, len(order), chunk)]
            seen = [set() for _ in range(t)]
            for c, queries in enumerate(chunks):
                keys = set(queries) | set(chunks[c - 1])  # c - 1 == -1 wraps, as in trax
                for i in queries:
                    seen[i] |= {j for j in keys if not is_causal or j <= i}
            rows.append(seen)
        visible.append(rows)
    return visible


def test_small_chunks_equal_attention_over_union_of_met_keys():
    # Several chunks and rounds: keys are met a varying number of times (twice within a round,
    # across rounds, through the wrap-around look-back), so the -log(count) correction must
    # make the result softmax over the set of keys met at least once.
    qk, v = _inputs(b=1, t=32, n=N, h=H, seed=3)
    key = jax.random.key(7)
    out = lsh_attention(jnp.asarray(qk), jnp.asarray(v), n_hashes=3, n_buckets=4, chunk=4,
                        key=key, is_causal=True)
    visible = _lsh_visible(qk, np.asarray(random_rotations(key, N, 3, H, 4)), 4, True)
    sizes = [len(s) for s in visible[0][0]]
    assert any(size < i + 1 for i, size in enumerate(sizes))  # the test really is sparse
    want = naive_shared_qk(qk, v, visible, H ** -0.5)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)


@functools.partial(jax.jit, static_argnames="is_causal")
def _weighted_grad(qk, v, w, is_causal):
    def loss(qk, v):
        out = lsh_attention(qk, v, n_hashes=3, n_buckets=4, chunk=4, key=jax.random.key(2),
                            is_causal=is_causal)
        return jnp.sum(out * w)

    return jax.grad(loss, argnums=(0, 1))(qk, v)


def test_causal_output_does_not_depend_on_future_tokens():
    qk, v = _inputs(b=1, t=32, n=N, h=H, seed=5)  # the configuration of the test above
    rng = np.random.default_rng(6)
    for i in (0, 5, 11, 30):
        w = np.zeros(qk.shape, np.float32)
        w[:, i] = rng.standard_normal(w[:, i].shape)  # a loss on query i only
        d_qk, d_v = (np.asarray(g) for g in _weighted_grad(qk, v, w, True))
        assert np.all(d_qk[:, i + 1:] == 0) and np.all(d_v[:, i + 1:] == 0)
        assert np.any(d_v[:, : i + 1] != 0)
    # Changing future values (hashing reads qk only) leaves past outputs untouched.
    v2 = v.copy()
    v2[:, 9:] += 10.0  # every head, every feature
    base, moved = (np.asarray(lsh_attention(jnp.asarray(qk), jnp.asarray(vv), n_hashes=3,
                                            n_buckets=4, chunk=4, key=jax.random.key(2),
                                            is_causal=True)) for vv in (v, v2))
    np.testing.assert_array_equal(base[:, :9], moved[:, :9])
    assert not np.allclose(base[:, 9:], moved[:, 9:])


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradients_finite(is_causal):
    qk, v = _inputs(b=1, t=32, n=N, h=H, seed=8)
    w = np.random.default_rng(9).standard_normal(qk.shape).astype(np.float32)
    for g in _weighted_grad(qk, v, w, is_causal):
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)


def test_many_buckets_small_chunks_finite_convex():
    # 32 buckets, chunks of 2: most buckets hold one token, many queries see no other key in
    # a round. Every output must be finite and a convex mix of the values it may see.
    qk, v = _inputs(b=2, t=64, n=N, h=H, seed=11)
    out = np.asarray(lsh_attention(jnp.asarray(qk), jnp.asarray(v), n_hashes=3, n_buckets=32,
                                   chunk=2, key=jax.random.key(4), is_causal=True))
    assert np.all(np.isfinite(out))
    for i in (0, 1, 30, 63):
        assert np.all(out[:, i] <= v[:, : i + 1].max(axis=1) + 1e-5)
        assert np.all(out[:, i] >= v[:, : i + 1].min(axis=1) - 1e-5)
    np.testing.assert_allclose(out[:, 0], v[:, 0], rtol=1e-6)  # alone: attends to itself


def test_bfloat16_keeps_dtype():
    qk, v = _inputs(b=2, t=16, n=N, h=H)
    out = lsh_attention(jnp.asarray(qk, jnp.bfloat16), jnp.asarray(v, jnp.bfloat16), n_hashes=1,
                        n_buckets=4, chunk=16, key=jax.random.key(0))
    assert out.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(out, np.float32)))


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(n_buckets=3, chunk=4), "n_buckets"),
    (dict(n_buckets=0, chunk=4), "n_buckets"),
    (dict(n_buckets=4, chunk=5), "chunk"),
    (dict(n_buckets=4, chunk=32), "chunk"),
    (dict(n_buckets=4, chunk=4, n_hashes=0), "n_hashes"),
])
def test_invalid_arguments_raise(kwargs, match):
    qk, v = _inputs()
    kwargs = {"n_hashes": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        lsh_attention(jnp.asarray(qk), jnp.asarray(v), key=jax.random.key(0), **kwargs)


@pytest.mark.parametrize("is_causal", [False, True])
def test_packed_documents_see_only_their_own_segment(is_causal):
    # One chunk holds every position: each query sees exactly its document's keys (and the
    # padding, segment 0, only itself), as if each document ran alone.
    qk, v = _inputs(b=2, t=16, n=N, h=H)
    seg = np.array([[1] * 7 + [2] * 6 + [0] * 3, [3] * 10 + [4] * 6], np.int32)
    out = lsh_attention(jnp.asarray(qk), jnp.asarray(v), n_hashes=3, n_buckets=4, chunk=16,
                        key=jax.random.key(1), is_causal=is_causal,
                        segment_ids=jnp.asarray(seg))
    visible = [[[{j for j in range(16) if seg[bi, j] == seg[bi, i] and
                  (not is_causal or j <= i)} for i in range(16)] for _ in range(N)]
               for bi in range(2)]
    want = naive_shared_qk(qk, v, visible, H ** -0.5)
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-4, atol=1e-5)
