"""Attention against naive numpy math, and the masking properties a decoder relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models import DecoderLM
from jaxformer.nn.attention_kernels import reference_attention, xla_attention
from jaxformer.nn.masks import causal_mask, segment_mask


def naive_attention(q, k, v, segment_ids):
    """Loops over batch, head and query in float64: the textbook formula, nothing shared."""
    b, t, n, h = q.shape
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for ni in range(n):
            for ti in range(t):
                allowed = [s for s in range(t)
                           if s <= ti and segment_ids[bi, s] == segment_ids[bi, ti]]
                scores = np.array([q[bi, ti, ni] @ k[bi, s, ni] / np.sqrt(h) for s in allowed])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[bi, ti, ni] = sum(wi * v[bi, s, ni] for wi, s in zip(w, allowed, strict=True))
    return out


@pytest.mark.parametrize("impl", [reference_attention, xla_attention])
def test_attention_matches_naive_math_with_packing_and_padding(impl):
    rng = np.random.default_rng(0)
    b, t, n, h = 2, 7, 3, 4
    q, k, v = (rng.normal(size=(b, t, n, h)) for _ in range(3))
    # Row 0: two packed documents; row 1: one document then two padding positions (segment 0).
    segment_ids = np.array([[1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 0, 0]])
    got = impl(*(jnp.asarray(x, jnp.float32) for x in (q, k, v)), is_causal=True,
               segment_ids=jnp.asarray(segment_ids))
    want = naive_attention(q, k, v, segment_ids)
    real = segment_ids > 0
    np.testing.assert_allclose(np.asarray(got)[real], want[real], atol=1e-5, rtol=1e-5)


def test_mask_is_causal_and_per_segment():
    seg = jnp.asarray([[1, 1, 2, 2, 0]])
    mask = np.asarray(causal_mask(5) & segment_mask(seg))[0, 0]
    want = np.array([[1, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0],
                     [0, 0, 1, 0, 0],
                     [0, 0, 1, 1, 0],
                     [0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(mask, want)


def tiny_model(**overrides) -> DecoderLM:
    cfg = ModelConfig(n_layers=2, d_model=32, n_heads=4, vocab_size=50, max_len=32, **overrides)
    return DecoderLM(cfg, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("pos_encoding", ["learned", "sinusoidal"])
def test_future_tokens_do_not_change_earlier_logits(pos_encoding):
    model = tiny_model(pos_encoding=pos_encoding)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 50, (2, 12))
    changed = tokens.copy()
    changed[:, 8:] = rng.integers(0, 50, (2, 4))
    pos = np.broadcast_to(np.arange(12), (2, 12))
    a = np.asarray(model(jnp.asarray(tokens), jnp.asarray(pos)))
    b = np.asarray(model(jnp.asarray(changed), jnp.asarray(pos)))
    np.testing.assert_allclose(a[:, :8], b[:, :8], atol=1e-6)
    assert np.abs(a[:, 8:] - b[:, 8:]).max() > 1e-3  # and the later ones do change


def test_packed_documents_do_not_see_each_other():
    model = tiny_model()
    rng = np.random.default_rng(2)
    doc_a, doc_b, doc_b2 = (rng.integers(0, 50, 6) for _ in range(3))

    def packed(first, second):
        tokens = np.concatenate([first, second])[None]
        pos = np.concatenate([np.arange(6), np.arange(6)])[None]
        seg = np.array([[1] * 6 + [2] * 6])
        return np.asarray(model(jnp.asarray(tokens), jnp.asarray(pos), jnp.asarray(seg)))[0]

    with_b, with_b2 = packed(doc_a, doc_b), packed(doc_a, doc_b2)
    np.testing.assert_allclose(with_b[:6], with_b2[:6], atol=1e-6)  # doc a ignores doc b
    alone = np.asarray(model(jnp.asarray(doc_b[None]), jnp.arange(6)[None]))[0]
    np.testing.assert_allclose(with_b[6:], alone, atol=1e-5)  # doc b as if it were alone


def test_bfloat16_compute_keeps_float32_params_and_close_logits():
    f32 = tiny_model()
    bf16 = tiny_model(compute_dtype="bfloat16")
    leaves = jax.tree.leaves(nnx.state(bf16))
    assert all(x.dtype == jnp.float32 for x in leaves)
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 50, (2, 10)))
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    a, b = f32(tokens, pos), bf16(tokens, pos)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=0.05)
