"""Attention kernels against naive float64 numpy, head grouping, fallbacks and dispatch."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.nn.attention_kernels import (
    IMPLEMENTATIONS,
    blocked_attention,
    cudnn_attention,
    flash_attention,
    get_attention_fn,
    reference_attention,
    resolve_implementation,
    splash_attention,
    xla_attention,
)
from jaxformer.nn.masks import make_mask, segment_mask, sliding_window_mask

# "blocked" with 2-token blocks, so the 8-token tests below go through its block path.
KERNELS = {"reference": reference_attention, "xla": xla_attention,
           "blocked": functools.partial(blocked_attention, block=2)}


def naive_attention(q, k, v, mask, bias, scale):
    """One (batch, head, query) at a time in float64; query head n reads kv head n // (N // K)."""
    b, t, n, h = q.shape
    kv = k.shape[2]
    out = np.zeros((b, t, n, h))
    for bi in range(b):
        for ni in range(n):
            ki = ni // (n // kv)
            for ti in range(t):
                seen = np.flatnonzero(mask[bi, 0, ti])
                if not len(seen):
                    continue  # a padding query: its output is unspecified
                scores = np.array([q[bi, ti, ni] @ k[bi, s, ki] * scale for s in seen])
                if bias is not None:
                    scores = scores + bias[bi % bias.shape[0], ni, ti, seen]
                w = np.exp(scores - scores.max())
                out[bi, ti, ni] = (w / w.sum()) @ v[bi, seen, ki]
    return out


def random_qkv(rng, b, t, s, n, kv, h):
    return (rng.normal(size=(b, t, n, h)), rng.normal(size=(b, s, kv, h)),
            rng.normal(size=(b, s, kv, h)))


def f32(*xs):
    return tuple(jnp.asarray(x, jnp.float32) for x in xs)


@pytest.mark.parametrize("impl", list(KERNELS))
@pytest.mark.parametrize("n, kv", [(4, 4), (8, 2), (8, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no_bias", "bias"])
def test_kernel_matches_naive_math_with_packing_and_padding(impl, n, kv, with_bias):
    rng = np.random.default_rng(0)
    b, t, h = 2, 8, 4
    q, k, v = random_qkv(rng, b, t, t, n, kv, h)
    # Row 0: two packed documents then padding; row 1: one document then padding.
    seg = np.array([[1, 1, 1, 2, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1, 0]])
    valid = seg > 0
    mask = np.asarray(make_mask("causal", segment_ids=jnp.asarray(seg), q_valid=valid))
    bias = rng.normal(size=(1, n, t, t)) if with_bias else None
    got = KERNELS[impl](*f32(q, k, v), mask=jnp.asarray(mask), scale=0.7,
                        bias=None if bias is None else jnp.asarray(bias, jnp.float32))
    want = naive_attention(q, k, v, mask, bias, 0.7)
    np.testing.assert_allclose(np.asarray(got)[valid], want[valid], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", list(KERNELS))
def test_cross_attention_with_an_arbitrary_mask_matches_naive_math(impl):
    rng = np.random.default_rng(1)
    b, t, s, n, kv, h = 2, 5, 9, 4, 2, 8
    q, k, v = random_qkv(rng, b, t, s, n, kv, h)
    mask = rng.random((b, n, t, s)) < 0.5  # per head, so [B, N, T, S]
    mask[..., 0] = True  # no empty row
    bias = rng.normal(size=(b, n, t, s))
    got = KERNELS[impl](*f32(q, k, v), mask=jnp.asarray(mask), bias=jnp.asarray(bias, jnp.float32))
    want = np.stack([naive_attention(q[:, :, [i]], k[:, :, [i // 2]], v[:, :, [i // 2]],
                                     mask[:, [i]], bias[:, [i]], h**-0.5)[:, :, 0]
                     for i in range(n)], axis=2)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", list(KERNELS))
def test_fully_masked_row_is_a_uniform_average_not_nan(impl):
    rng = np.random.default_rng(2)
    q, k, v = f32(*random_qkv(rng, 1, 3, 4, 2, 2, 4))
    mask = jnp.ones((1, 1, 3, 4), bool).at[:, :, 1].set(False)
    bias = jnp.asarray(rng.normal(size=(1, 2, 3, 4)), jnp.float32)
    out = np.asarray(KERNELS[impl](q, k, v, mask=mask, bias=bias))
    np.testing.assert_allclose(out[0, 1], np.asarray(v)[0].mean(axis=0), atol=1e-6)


@pytest.mark.parametrize("impl", list(KERNELS))
@pytest.mark.parametrize("kv", [2, 1], ids=["gqa", "mqa"])
def test_grouped_heads_equal_mha_with_repeated_kv(impl, kv):
    rng = np.random.default_rng(3)
    q, k, v = f32(*random_qkv(rng, 2, 8, 8, 8, kv, 4))
    grouped = KERNELS[impl](q, k, v, is_causal=True)
    repeated = KERNELS[impl](q, jnp.repeat(k, 8 // kv, axis=2), jnp.repeat(v, 8 // kv, axis=2),
                             is_causal=True)
    np.testing.assert_allclose(np.asarray(grouped), np.asarray(repeated), atol=1e-6)


@pytest.mark.parametrize("impl", list(KERNELS))
def test_structured_mask_arguments_equal_their_dense_masks(impl):
    rng = np.random.default_rng(4)
    q, k, v = f32(*random_qkv(rng, 2, 8, 8, 4, 2, 4))
    seg = jnp.asarray([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
    fn = KERNELS[impl]
    cases = [(dict(is_causal=True), make_mask("causal", seq_len=8)),
             (dict(segment_ids=seg), segment_mask(seg)),
             (dict(window=3, segment_ids=seg),
              sliding_window_mask(8, window=3) & segment_mask(seg))]
    for structured, dense in cases:
        np.testing.assert_allclose(np.asarray(fn(q, k, v, **structured)),
                                   np.asarray(reference_attention(q, k, v, mask=dense)),
                                   atol=1e-6, err_msg=str(list(structured)))


def test_bad_shapes_raise():
    q, k = jnp.zeros((1, 4, 6, 8)), jnp.zeros((1, 4, 4, 8))
    for fn in IMPLEMENTATIONS.values():
        with pytest.raises(ValueError, match="must divide"):
            fn(q, k, k)
        with pytest.raises(ValueError, match="T == S"):
            fn(q, k[:, :3, :2], k[:, :3, :2], segment_ids=jnp.ones((1, 4), jnp.int32))


# --- The fused kernels, run in the Pallas interpreter (CPU) against the reference. ----------

PALLAS = {"flash": flash_attention, "splash": splash_attention}


@pytest.mark.parametrize("name", list(PALLAS))
def test_pallas_kernels_match_reference_in_interpreter(name):
    rng = np.random.default_rng(5)
    q, k, v = f32(*random_qkv(rng, 1, 128, 128, 4, 2, 16))
    seg = jnp.asarray(np.repeat([[1, 2, 0]], [60, 50, 18], axis=1))
    cases = [dict(is_causal=True, segment_ids=seg, scale=0.3), dict(segment_ids=seg)]
    if name == "splash":
        cases.append(dict(window=20, segment_ids=seg))
    for kwargs in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # these inputs must not fall back
            got = PALLAS[name](q, k, v, interpret=True, **kwargs)
        want = reference_attention(q, k, v, **kwargs)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5,
                                   err_msg=str(kwargs))


@pytest.mark.parametrize("name", list(PALLAS))
def test_pallas_kernel_gradients_match_reference_in_interpreter(name):
    rng = np.random.default_rng(6)
    q, k, v = f32(*random_qkv(rng, 1, 128, 128, 2, 1, 16))

    def loss(fn, q, k, v, **kw):
        return (fn(q, k, v, is_causal=True, **kw) ** 2).sum()

    got = jax.grad(lambda *a: loss(PALLAS[name], *a, interpret=True), argnums=(0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: loss(reference_attention, *a), argnums=(0, 1, 2))(q, k, v)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=1e-4)


@pytest.mark.parametrize("name, kwargs, reason", [
    ("flash", dict(mask=jnp.ones((1, 1, 128, 128), bool)), "a dense mask"),
    ("flash", dict(bias=jnp.zeros((1, 1, 128, 128))), "a bias"),
    ("flash", dict(window=4), "a sliding window"),
    ("flash", dict(seq_len=96), "T=96, S=96"),
    ("splash", dict(mask=jnp.ones((1, 1, 128, 128), bool)), "a dense mask"),
    ("splash", dict(seq_len=96), "T=96, S=96"),
    ("cudnn", dict(), "dtype float32"),  # float32 is outside cuDNN's flash path
])
def test_unsupported_inputs_fall_back_to_xla_with_a_warning(name, kwargs, reason):
    kwargs = dict(kwargs)
    t = kwargs.pop("seq_len", 128)
    q, k, v = f32(*random_qkv(np.random.default_rng(7), 1, t, t, 2, 2, 8))
    fn = dict(PALLAS, cudnn=cudnn_attention)[name]
    with pytest.warns(UserWarning, match=f"'{name}' cannot take {reason}.*using 'xla'"):
        got = fn(q, k, v, is_causal=True, **kwargs)
    np.testing.assert_array_equal(np.asarray(got),
                                  np.asarray(xla_attention(q, k, v, is_causal=True, **kwargs)))


# --- The blocked kernel -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [
    dict(is_causal=True),
    dict(is_causal=True, segment_ids="packed"),
    dict(window=5, segment_ids="packed"),
    dict(window=4, is_causal=True, bias="per_head"),
], ids=["causal", "causal+segments", "window+segments", "window+bias"])
@pytest.mark.parametrize("block", [4, 8])
def test_blocked_values_and_gradients_equal_the_reference(kwargs, block):
    rng = np.random.default_rng(5)
    q, k, v = f32(*random_qkv(rng, 2, 16, 16, 4, 2, 8))
    extra = dict(kwargs)
    if extra.get("segment_ids") == "packed":
        extra["segment_ids"] = jnp.asarray([[1] * 6 + [2] * 7 + [0] * 3, [1] * 16])
    if extra.get("bias") == "per_head":
        extra["bias"] = jnp.asarray(rng.normal(size=(1, 4, 16, 16)), jnp.float32)

    def loss(fn, q, k, v):
        return jnp.sum(jnp.sin(fn(q, k, v, **extra)))

    blocked = functools.partial(blocked_attention, block=block)
    got = jax.value_and_grad(functools.partial(loss, blocked), argnums=(0, 1, 2))(q, k, v)
    want = jax.value_and_grad(functools.partial(loss, reference_attention),
                              argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_blocked_never_reads_the_hidden_key_blocks():
    """Values after the first block are NaN: the reference multiplies them by zero weights
    (NaN), the blocked kernel never reads them for the first block's queries."""
    rng = np.random.default_rng(6)
    q, k, v = f32(*random_qkv(rng, 1, 8, 8, 2, 2, 4))
    v = v.at[:, 4:].set(jnp.nan)
    blocked = np.asarray(blocked_attention(q, k, v, is_causal=True, block=4))
    reference = np.asarray(reference_attention(q, k, v, is_causal=True))
    assert np.isnan(reference[:, :4]).all()
    assert np.isfinite(blocked[:, :4]).all()
    np.testing.assert_allclose(blocked[:, :4],
                               np.asarray(reference_attention(q[:, :4], k[:, :4], v[:, :4],
                                                              is_causal=True)), atol=1e-6)


def test_blocked_runs_the_reference_under_sequence_parallelism():
    """With the length axis split over devices, slicing it into blocks would move data between
    devices; the kernel computes the full square instead (here: it reads the NaN values)."""
    from jax.sharding import AbstractMesh

    from jaxformer.parallel.sharding import activation_sharding, is_split

    rng = np.random.default_rng(6)
    q, k, v = f32(*random_qkv(rng, 1, 8, 8, 2, 2, 4))
    v = v.at[:, 4:].set(jnp.nan)
    for sizes, split in (((2, 1), True), ((1, 2), False)):
        mesh = AbstractMesh(sizes, ("sequence", "data"))
        with activation_sharding(mesh, {"length": ("sequence",), "batch": ("data",)}):
            assert is_split("length") is split
            out = np.asarray(blocked_attention(q, k, v, is_causal=True, block=4))
        assert bool(np.isnan(out[:, :4]).all()) is split


@pytest.mark.parametrize("kwargs, shapes", [
    (dict(), (8, 8)),                    # bidirectional: nothing to skip
    (dict(is_causal=True), (4, 8)),      # T != S (e.g. decoding against a cache)
    (dict(is_causal=True), (6, 6)),      # T not a multiple of the block
])
def test_blocked_runs_the_reference_where_it_cannot_skip(kwargs, shapes):
    rng = np.random.default_rng(7)
    q, k, v = f32(*random_qkv(rng, 1, shapes[0], shapes[1], 2, 2, 4))
    np.testing.assert_array_equal(
        np.asarray(blocked_attention(q, k, v, block=4, **kwargs)),
        np.asarray(reference_attention(q, k, v, **kwargs)))


# --- Dispatch ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name, backend, want", [
    ("auto", "cpu", "blocked"), ("reference", "cpu", "reference"), ("xla", "cpu", "xla"),
    ("blocked", "cpu", "blocked"), ("blocked", "gpu", "blocked"), ("blocked", "tpu", "blocked"),
    ("auto", "gpu", "cudnn"), ("cudnn", "gpu", "cudnn"), ("flash", "gpu", "flash"),
    ("xla", "gpu", "xla"), ("reference", "gpu", "reference"),
    ("auto", "tpu", "splash"), ("splash", "tpu", "splash"), ("flash", "tpu", "splash"),
    ("xla", "tpu", "xla"), ("reference", "tpu", "reference"),
])
def test_resolve_implementation_table(name, backend, want):
    assert resolve_implementation(name, backend) == want
    assert want in IMPLEMENTATIONS


@pytest.mark.parametrize("name, backend, choices", [
    ("flash", "cpu", "auto, reference, blocked, xla"),
    ("cudnn", "cpu", "auto, reference, blocked, xla"),
    ("splash", "gpu", "auto, reference, blocked, xla, cudnn, flash"),
    ("cudnn", "tpu", "auto, reference, blocked, xla, splash, flash"),
    ("fast", "gpu", "auto, reference, blocked, xla, cudnn, flash"),
])
def test_unavailable_implementation_is_a_one_line_error(name, backend, choices):
    with pytest.raises(ValueError) as err:
        resolve_implementation(name, backend)
    message = str(err.value)
    assert "\n" not in message
    assert f"{name!r}" in message and f"backend {backend!r}" in message
    assert message.endswith(f"choose one of: {choices}")


def test_unknown_backend_is_an_error():
    with pytest.raises(ValueError, match="unknown backend 'metal'.*cpu, gpu, tpu"):
        resolve_implementation("auto", "metal")


def test_get_attention_fn_uses_the_default_backend():
    assert jax.default_backend() == "cpu"
    assert get_attention_fn() is blocked_attention
    assert get_attention_fn("reference") is reference_attention
