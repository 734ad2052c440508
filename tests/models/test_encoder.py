"""EncoderModel: bidirectional attention, packing isolation, heads, parameter metadata."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.models import ARCHITECTURES, build_model, presets
from jaxformer.models.encoder import EncoderModel

V = 53


def tiny(**overrides) -> EncoderModel:
    cfg = presets.bert(**{**dict(n_layers=2, d_model=32, n_heads=4, vocab_size=V, d_ff=64,
                                 max_len=32, init_std=0.2), **overrides})
    return build_model(cfg, nnx.Rngs(0))


@functools.cache
def _compiled(graphdef: nnx.GraphDef, method: str):
    return jax.jit(lambda state, *args, **kw: getattr(nnx.merge(graphdef, state), method)(
        *args, **kw))


def run(model: EncoderModel, args: tuple, method: str = "__call__", **kw) -> np.ndarray:
    """model.method(*args) compiled as one program (much faster than op-by-op on CPU)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_compiled(graphdef, method)(state, *args, **kw))


def positions_of(segment_ids: np.ndarray) -> np.ndarray:
    """Positions restarting at 0 at each new segment of each row."""
    pos = np.zeros_like(segment_ids)
    for b in range(segment_ids.shape[0]):
        for t in range(1, segment_ids.shape[1]):
            same = segment_ids[b, t] == segment_ids[b, t - 1]
            pos[b, t] = pos[b, t - 1] + 1 if same else 0
    return pos


def test_registered_and_shapes():
    assert ARCHITECTURES["encoder"] is EncoderModel
    model = tiny()
    tokens = jnp.ones((2, 7), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    assert run(model, (tokens, pos, None)).shape == (2, 7, V)
    assert model.pooler is None and model.classifier is None
    with pytest.raises(ValueError, match="num_labels"):
        model.classify(tokens, pos, None)


@pytest.mark.parametrize("pos_encoding", ["learned", "t5_relative", "rope"])
def test_packed_segments_and_padding_are_isolated(pos_encoding):
    model = tiny(pos_encoding=pos_encoding)
    rng = np.random.default_rng(0)
    a, b = rng.integers(1, V, 5), rng.integers(1, V, 4)
    # Row: segment 1 (a), segment 2 (b), three padding slots.
    tokens = np.concatenate([a, b, [0, 0, 0]])[None]
    seg = np.array([[1] * 5 + [2] * 4 + [0] * 3])
    types = np.array([[0, 0, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0]])
    packed = run(model, args=(jnp.asarray(tokens), jnp.asarray(positions_of(seg)),
                              jnp.asarray(seg), jnp.asarray(types)))
    alone_a = run(model, args=(jnp.asarray(a[None]), jnp.arange(5)[None],
                               jnp.ones((1, 5), jnp.int32), jnp.asarray(types[:, :5])))
    alone_b = run(model, args=(jnp.asarray(b[None]), jnp.arange(4)[None],
                               jnp.ones((1, 4), jnp.int32), jnp.asarray(types[:, 5:9])))
    assert np.abs(packed[0, :5] - alone_a[0]).max() < 1e-5
    assert np.abs(packed[0, 5:9] - alone_b[0]).max() < 1e-5
    # Other padding tokens change nothing real.
    tokens2 = tokens.copy()
    tokens2[0, 9:] = [7, 8, 9]
    packed2 = run(model, args=(jnp.asarray(tokens2), jnp.asarray(positions_of(seg)),
                               jnp.asarray(seg), jnp.asarray(types)))
    assert np.abs(packed2[0, :9] - packed[0, :9]).max() == 0.0
    assert np.abs(packed[0, :9]).max() > 0.5  # not trivially equal


def test_attention_is_bidirectional():
    model = tiny()
    tokens = np.array([[5, 6, 7, 8, 9, 0]])
    seg = np.array([[1, 1, 1, 1, 1, 0]])
    pos = jnp.arange(6)[None]
    out = run(model, args=(jnp.asarray(tokens), pos, jnp.asarray(seg)))
    tokens[0, 4] = 10  # the last real token
    changed = run(model, args=(jnp.asarray(tokens), pos, jnp.asarray(seg)))
    assert np.abs(changed[0, 0] - out[0, 0]).max() > 1e-3  # the first token sees the last


def test_token_types_change_outputs():
    model = tiny()
    tokens = jnp.asarray([[5, 6, 7, 8]])
    pos = jnp.arange(4)[None]
    zero = run(model, args=(tokens, pos, None))
    explicit = run(model, args=(tokens, pos, None, jnp.zeros((1, 4), jnp.int32)))
    assert np.abs(explicit - zero).max() < 1e-5  # None means all type 0
    ones = run(model, args=(tokens, pos, None, jnp.ones((1, 4), jnp.int32)))
    assert np.abs(ones - zero).max() > 1e-3


def test_classification_head_and_untied_head():
    model = tiny(num_labels=3)
    assert model.mlm is None
    tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 0, 0]])
    seg = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]])
    pos = jnp.asarray(positions_of(np.asarray(seg)))
    logits = run(model, method="classify", args=(tokens, pos, seg))
    assert logits.shape == (2, 3) and logits.dtype == np.float32
    # The padding of row 1 does not matter.
    other = run(model, method="classify", args=(tokens.at[1, 2:].set(3), pos, seg))
    assert np.abs(other - logits).max() == 0.0
    with pytest.raises(ValueError, match="classify"):
        model(tokens, pos, seg)
    untied = tiny(tie_embeddings=False)
    assert untied.mlm.unembed.lm_head[...].shape == (32, V)
    assert run(untied, (tokens, pos, seg)).shape == (2, 4, V)


def test_two_tower_head_reads_each_half_on_its_own():
    """classify_pair = dense(relu(dense([u, v, u*v, u-v]))), LRA's dual head, of the pooled
    first tokens of two separately encoded halves (written out here with encode, the pooler
    and the two dense layers' weights)."""
    model = tiny(num_labels=2, two_tower=True)
    d_ff = model.cfg.d_ff
    assert model.pair_hidden.w[...].shape == (4 * 32, d_ff)
    assert model.classifier.w[...].shape == (d_ff, 2)
    t = 6
    a = np.asarray([[5, 6, 7, 8, 0, 0], [9, 10, 11, 12, 13, 14]])
    b = np.asarray([[20, 21, 22, 0, 0, 0], [30, 31, 32, 33, 34, 0]])
    seg_a, seg_b = (a > 0).astype(np.int32), (b > 0).astype(np.int32)
    pos_a, pos_b = np.where(seg_a, np.arange(t), 0), np.where(seg_b, np.arange(t), 0)
    row = lambda x, y: jnp.asarray(np.concatenate([x, y], axis=1))  # noqa: E731
    logits = run(model, method="classify_pair",
                 args=(row(a, b), row(pos_a, pos_b), row(seg_a, seg_b)))
    assert logits.shape == (2, 2) and logits.dtype == np.float32

    def pooled(tokens, pos, seg):
        x = run(model, method="encode", args=(jnp.asarray(tokens), jnp.asarray(pos),
                                              jnp.asarray(seg)))
        return np.tanh(x[:, 0] @ np.asarray(model.pooler.w[...]) + np.asarray(model.pooler.b[...]))

    u, v = pooled(a, pos_a, seg_a), pooled(b, pos_b, seg_b)
    hidden = np.maximum(np.concatenate([u, v, u * v, u - v], axis=1)
                        @ np.asarray(model.pair_hidden.w[...])
                        + np.asarray(model.pair_hidden.b[...]), 0.0)
    expected = hidden @ np.asarray(model.classifier.w[...]) + np.asarray(model.classifier.b[...])
    assert (hidden == 0).any() and (hidden > 0).any()  # the ReLU is not a no-op here
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    # the towers are asymmetric in u - v: swapping the documents changes the logits
    swapped = run(model, method="classify_pair",
                  args=(row(b, a), row(pos_b, pos_a), row(seg_b, seg_a)))
    assert np.abs(swapped - logits).max() > 1e-4
    with pytest.raises(ValueError, match="classify_pair"):
        model.classify(jnp.asarray(a), jnp.asarray(pos_a), jnp.asarray(seg_a))
    with pytest.raises(ValueError, match="two_tower"):
        tiny(num_labels=2).classify_pair(row(a, b), row(pos_a, pos_b), row(seg_a, seg_b))


def test_mean_pooling_reads_the_mean_of_the_real_tokens():
    model = tiny(num_labels=3, pooling="mean")
    tokens = jnp.asarray([[5, 6, 7, 8], [9, 10, 0, 0]])
    seg = jnp.asarray([[1, 1, 1, 1], [1, 1, 0, 0]])
    pos = jnp.asarray(positions_of(np.asarray(seg)))
    logits = run(model, method="classify", args=(tokens, pos, seg))
    x = run(model, method="encode", args=(tokens, pos, seg))
    mean = np.stack([x[0].mean(0), x[1, :2].mean(0)])  # row 1: its two real tokens only
    pooled = np.tanh(mean @ np.asarray(model.pooler.w[...]) + np.asarray(model.pooler.b[...]))
    expected = pooled @ np.asarray(model.classifier.w[...]) + np.asarray(model.classifier.b[...])
    np.testing.assert_allclose(logits, expected, atol=1e-5)
    first = tiny(num_labels=3)  # the same weights, BERT's first-token pooling: other logits
    assert np.abs(run(first, method="classify", args=(tokens, pos, seg)) - logits).max() > 1e-4


def test_dropout_only_with_a_key():
    model = tiny(dropout=0.3, num_labels=2)
    tokens = jnp.asarray([[5, 6, 7, 8]])
    pos = jnp.arange(4)[None]
    a = run(model, method="classify", args=(tokens, pos))
    assert np.array_equal(a, run(model, method="classify", args=(tokens, pos)))
    b = run(model, method="classify", args=(tokens, pos), dropout_rng=jax.random.key(1))
    assert np.abs(a - b).max() > 1e-4


@pytest.mark.parametrize("overrides", [{}, {"num_labels": 3, "tie_embeddings": False}])
def test_every_param_has_logical_axes(overrides):
    state = nnx.state(tiny(**overrides), nnx.Param)
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    assert leaves
    for var in leaves:
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var[...].ndim, (axes, var[...].shape)
