"""Linear attention (Katharopoulos et al. 2020) against naive float64 numpy and its own RNN form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.nn.linear_attention import (
    LinearState,
    init_linear_state,
    linear_attention,
    linear_attention_step,
)

EPS = 1e-6


def _inputs(seed: int, b: int = 2, t: int = 19, n: int = 4, kh: int = 2, h: int = 8,
            s: int | None = None) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    rng = np.random.default_rng(seed)
    s = t if s is None else s
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k = rng.standard_normal((b, s, kh, h)).astype(np.float32)
    v = rng.standard_normal((b, s, kh, h)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)


def _phi(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    return np.where(x > 0, x + 1.0, np.exp(x))  # elu(x) + 1


def _naive(q, k, v, visible: np.ndarray | None = None) -> np.ndarray:
    """Quadratic float64 form: out_i = sum_j a_ij phi(q_i).phi(k_j) v_j / (sum_j a_ij ... + eps).

    visible: [B|1, T, S] 0/1 (None: all keys).
    """
    q, k, v = _phi(q), _phi(k), np.asarray(v, np.float64)
    g = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)  # query head n reads kv head n // g
    scores = np.einsum("btnh,bsnh->bnts", q, k)
    if visible is not None:
        scores = scores * visible[:, None]
    num = np.einsum("bnts,bsnv->btnv", scores, v)
    return num / (scores.sum(-1).transpose(0, 2, 1)[..., None] + EPS)


def _tril(t: int) -> np.ndarray:
    return np.tril(np.ones((1, t, t)))


def _token_by_token(q, k, v) -> np.ndarray:
    state = init_linear_state(q.shape[0], k.shape[2], q.shape[3], v.shape[3])
    outs = []
    for i in range(q.shape[1]):
        out, state = linear_attention_step(state, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1])
        outs.append(out)
    return np.concatenate(outs, axis=1)


def test_noncausal_matches_naive_numpy_grouped_heads():
    q, k, v = _inputs(0, t=12, s=20, n=4, kh=2)  # cross-attention lengths, G = 2
    out = linear_attention(q, k, v)
    assert out.shape == (2, 12, 4, 8) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, _naive(q, k, v), rtol=1e-5, atol=1e-5)


def test_causal_chunked_matches_quadratic_and_recurrent():
    q, k, v = _inputs(1, t=19)  # 19 = 4 * 4 + 3: padded last chunk
    out = np.asarray(linear_attention(q, k, v, is_causal=True, chunk=4))
    np.testing.assert_allclose(out, _naive(q, k, v, _tril(19)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out, _token_by_token(q, k, v), rtol=1e-5, atol=1e-5)


def test_state_decoding_matches_full_forward():
    q, k, v = _inputs(2, t=15)
    full = linear_attention(q, k, v, is_causal=True, chunk=4)
    state = init_linear_state(2, 2, 8, 8)
    prompt_out, state = linear_attention_step(state, q[:, :10], k[:, :10], v[:, :10])
    outs = [prompt_out]
    for i in range(10, 15):
        out, state = linear_attention_step(state, q[:, i:i + 1], k[:, i:i + 1], v[:, i:i + 1])
        outs.append(out)
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
    # The final state is exactly the sums over all 15 tokens.
    phi_k = _phi(k)
    np.testing.assert_allclose(state.s, np.einsum("bskh,bskv->bkhv", phi_k, v), rtol=1e-5)
    np.testing.assert_allclose(state.z, phi_k.sum(1), rtol=1e-5)


def test_causal_leaks_no_future_token():
    q, k, v = _inputs(3, t=19)
    cut = 6  # mid-chunk for chunk=4, so the in-chunk mask is what protects the past
    noise = _inputs(4, t=19)
    later = jnp.arange(19)[None, :, None, None] >= cut
    q2, k2, v2 = (jnp.where(later, a + 3.0 * b, a) for a, b in zip((q, k, v), noise,
                                                                      strict=True))
    out = linear_attention(q, k, v, is_causal=True, chunk=4)
    out2 = linear_attention(q2, k2, v2, is_causal=True, chunk=4)
    np.testing.assert_array_equal(out[:, :cut], out2[:, :cut])
    assert not np.allclose(out[:, cut:], out2[:, cut:])  # the perturbation was real


def test_gradients_finite_and_chunk_independent():
    q, k, v = _inputs(5, t=19)
    w = jnp.asarray(np.random.default_rng(6).standard_normal((2, 19, 4, 8)), jnp.float32)

    def grads(chunk):
        loss = lambda q, k, v: jnp.sum(  # noqa: E731
            linear_attention(q, k, v, is_causal=True, chunk=chunk) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)  # one compile per chunk

    g4, g16 = grads(4), grads(16)
    for a, b in zip(g4, g16, strict=True):
        assert np.all(np.isfinite(a)) and np.abs(a).max() > 0
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# row 0: boundary mid-chunk; row 1: on a chunk edge (chunk=4); both rows hold 7 + 12 tokens,
# and the ids are not 0/1 (only equality within a run matters).
SPLITS = (7, 12)
SEGMENT_IDS = np.stack([np.where(np.arange(19) < s, 3, 5) for s in SPLITS])


def test_causal_segments_equal_separate_documents():
    q, k, v = _inputs(7, t=19)
    out = np.asarray(linear_attention(q, k, v, is_causal=True, chunk=4,
                                      segment_ids=jnp.asarray(SEGMENT_IDS)))
    for row, s in enumerate(SPLITS):
        for doc in (slice(0, s), slice(s, 19)):
            a, b, c = (x[row:row + 1, doc] for x in (q, k, v))
            alone = linear_attention(a, b, c, is_causal=True, chunk=4)
            np.testing.assert_allclose(out[row:row + 1, doc], alone, rtol=1e-5, atol=1e-5)


def test_noncausal_segments_match_block_diagonal_naive():
    q, k, v = _inputs(8, t=19)
    out = linear_attention(q, k, v, chunk=4, segment_ids=jnp.asarray(SEGMENT_IDS))
    same_doc = (SEGMENT_IDS[:, :, None] == SEGMENT_IDS[:, None, :]).astype(np.float64)
    np.testing.assert_allclose(out, _naive(q, k, v, same_doc), rtol=1e-5, atol=1e-5)


def test_state_shape_does_not_depend_on_length():
    shapes = set()
    for t in (1, 70):  # 70 > 64: the prompt path runs more than one chunk
        q, k, v = _inputs(8, t=t)
        state = init_linear_state(2, 2, 8, 8)
        out, state = linear_attention_step(state, q, k, v)
        assert isinstance(state, LinearState) and out.shape == (2, t, 4, 8)
        assert state.s.dtype == state.z.dtype == jnp.float32
        shapes.add((state.s.shape, state.z.shape))
    assert shapes == {((2, 2, 8, 8), (2, 2, 8))}


def test_invalid_arguments_raise():
    q, k, v = _inputs(9, t=8)
    with pytest.raises(ValueError, match="chunk"):
        linear_attention(q, k, v, is_causal=True, chunk=0)
    with pytest.raises(ValueError, match="T == S"):
        linear_attention(q, k[:, :4], v[:, :4], is_causal=True)
    with pytest.raises(ValueError, match="must divide"):
        linear_attention(q[:, :, :3], k, v)
    with pytest.raises(ValueError, match="state"):
        linear_attention_step(init_linear_state(2, 2, 8, 4), q, k, v)
