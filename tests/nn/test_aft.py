"""Attention Free Transformer (Zhai et al. 2021): the three mixing functions against the paper's
formula written out naively in float64 numpy, causality, packing, large values, gradients, and
the AFT module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.nn.aft import AFT, aft_full, aft_local, aft_simple

B, T, D = 2, 16, 8


def inputs(seed: int = 0, k_scale: float = 1.0, k_shift: float = 0.0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, T, D)).astype(np.float32) for _ in range(3))
    w = rng.standard_normal((T, T)).astype(np.float32)
    return q, (k_scale * k + k_shift).astype(np.float32), v, w


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def naive_aft(q, k, v, w, is_causal=False, segment_ids=None):
    """Paper eq. 2 in float64, a loop over batch and t: no shifts (float64 holds exp(150))."""
    q, k, v, w = (np.asarray(a, np.float64) for a in (q, k, v, w))
    out = np.zeros(q.shape)
    for b in range(q.shape[0]):
        for t in range(q.shape[1]):
            keys = [s for s in range(q.shape[1]) if (not is_causal or s <= t)
                    and (segment_ids is None or segment_ids[b][s] == segment_ids[b][t])]
            e = np.exp(k[b, keys] + w[t, keys][:, None])  # [S, D]
            out[b, t] = np_sigmoid(q[b, t]) * (e * v[b, keys]).sum(0) / e.sum(0)
    return out


def np_simple(q, k, v, is_causal=False):
    """Paper eq. 4 in closed form: softmax of K over time (prefix softmax when causal)."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    e = np.exp(k)
    if is_causal:
        mixed = np.cumsum(e * v, axis=1) / np.cumsum(e, axis=1)
    else:
        mixed = (e * v).sum(1, keepdims=True) / e.sum(1, keepdims=True)
    return np_sigmoid(q) * mixed


def np_local(w, window):
    t = np.arange(w.shape[0])
    return np.where(np.abs(t[:, None] - t[None, :]) < window, w, 0.0)


@pytest.mark.parametrize("is_causal", [False, True])
def test_simple_matches_closed_form(is_causal):
    q, k, v, _ = inputs(1, k_scale=3.0)
    got = aft_simple(q, k, v, is_causal=is_causal)
    np.testing.assert_allclose(got, np_simple(q, k, v, is_causal), rtol=1e-5, atol=1e-6)
    # A length that is not a power of two (the causal scan doubles its stride up to T).
    q, k, v = (a[:, :T - 3] for a in (q, k, v))
    got = aft_simple(q, k, v, is_causal=is_causal)
    np.testing.assert_allclose(got, np_simple(q, k, v, is_causal), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("is_causal", [False, True])
def test_full_matches_naive_loop_and_zero_w_is_simple(is_causal):
    q, k, v, w = inputs(2)
    w = 3.0 * w
    got = aft_full(q, k, v, w, is_causal=is_causal)
    np.testing.assert_allclose(got, naive_aft(q, k, v, w, is_causal), rtol=1e-5, atol=1e-6)
    zero = aft_full(q, k, v, np.zeros_like(w), is_causal=is_causal)
    np.testing.assert_allclose(zero, aft_simple(q, k, v, is_causal=is_causal),
                               rtol=1e-5, atol=1e-6)
    # w matters: a nonzero table gives a different answer than w = 0.
    assert np.abs(np.asarray(got) - np.asarray(zero)).max() > 1e-2


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, T + 5])
def test_local_is_full_with_w_zeroed_outside_window(is_causal, window):
    q, k, v, w = inputs(3)
    w = 3.0 * w
    got = aft_local(q, k, v, w, window=window, is_causal=is_causal)
    want = naive_aft(q, k, v, np_local(w, window), is_causal)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    if window < T:  # the outside entries of w are really dropped
        assert np.abs(np.asarray(got) - np.asarray(aft_full(q, k, v, w, is_causal=is_causal))
                      ).max() > 1e-2


def all_fns(w):
    return {"simple": lambda q, k, v, **kw: aft_simple(q, k, v, **kw),
            "full": lambda q, k, v, **kw: aft_full(q, k, v, w, **kw),
            "local": lambda q, k, v, **kw: aft_local(q, k, v, w, window=3, **kw)}


@pytest.mark.parametrize("name", ["simple", "full", "local"])
def test_causal_leaks_no_future(name):
    q, k, v, w = inputs(4)
    fn = all_fns(w)[name]
    cut = 7
    q2, k2, v2 = (a.copy() for a in (q, k, v))
    for a in (q2, k2, v2):
        a[:, cut + 1:] += 5.0 * np.random.default_rng(5).standard_normal(a[:, cut + 1:].shape)
    y, y2 = (np.asarray(fn(*x, is_causal=True)) for x in ((q, k, v), (q2, k2, v2)))
    # Not bit-equal for full/local: the per-channel shift max_t K, which cancels in the ratio,
    # spans the whole sequence, so later tokens move earlier rows by float rounding only.
    np.testing.assert_allclose(y[:, :cut + 1], y2[:, :cut + 1], rtol=1e-6, atol=1e-7)
    assert np.abs(y[:, cut + 1:] - y2[:, cut + 1:]).min() > 0
    # Non-causal, the same change reaches every position.
    y, y2 = (np.asarray(fn(*x)) for x in ((q, k, v), (q2, k2, v2)))
    assert np.abs(y[:, :cut + 1] - y2[:, :cut + 1]).max() > 1e-3


@pytest.mark.parametrize("is_causal", [False, True])
def test_large_k_and_w_finite_and_correct(is_causal):
    # K around 80 (exp(80 + 40) overflows float32) and large pairwise biases.
    q, k, v, w = inputs(6, k_scale=4.0, k_shift=80.0)
    w = 40.0 + 10.0 * w
    for got, want in ((aft_full(q, k, v, w, is_causal=is_causal),
                       naive_aft(q, k, v, w, is_causal)),
                      (aft_local(q, k, v, w, window=4, is_causal=is_causal),
                       naive_aft(q, k, v, np_local(w, 4), is_causal)),
                      (aft_simple(q, k, v, is_causal=is_causal),
                       np_simple(q, k, v, is_causal))):
        assert np.isfinite(np.asarray(got)).all()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_wide_spread_k():
    # K from -80 to 80 in one channel: the per-channel max shift of the matmul form still
    # holds without causality (the argmax of K is visible to every row); causal AFT-simple's
    # streaming log-sum-exp holds for any K.
    q, k, v, w = inputs(7)
    k = np.broadcast_to(np.linspace(-80, 80, T, dtype=np.float32)[None, :, None],
                        (B, T, D)) + 0.5 * k
    k = np.ascontiguousarray(k[:, np.random.default_rng(8).permutation(T)])
    np.testing.assert_allclose(aft_full(q, k, v, 5.0 * w), naive_aft(q, k, v, 5.0 * w),
                               rtol=1e-4, atol=1e-5)
    for is_causal in (False, True):
        got = aft_simple(q, k, v, is_causal=is_causal)
        np.testing.assert_allclose(got, np_simple(q, k, v, is_causal), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradients_finite_and_match_float64(is_causal):
    q, k, v, w = inputs(9, k_scale=4.0, k_shift=80.0)
    w = 40.0 + 10.0 * w
    segs = np.repeat(np.array([[1, 2], [3, 3]]), T // 2, axis=1)
    for fn in (lambda q, k, v, w: aft_full(q, k, v, w, is_causal=is_causal),
               lambda q, k, v, w: aft_local(q, k, v, w, window=3, is_causal=is_causal),
               lambda q, k, v, w: aft_simple(q, k, v, is_causal=is_causal) + 0 * w[0, 0],
               lambda q, k, v, w: aft_simple(q, k, v, is_causal=is_causal, segment_ids=segs)
               + 0 * w[0, 0]):
        grads = jax.grad(lambda *a, fn=fn: jnp.sum(fn(*a) * v), argnums=(0, 1, 2, 3))(
            q, k, v, w)
        assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    # Against central differences of the float64 formula, for K and w (the shifted inputs).
    g_k, g_w = jax.grad(lambda k, w: jnp.sum(aft_full(q, k, w=w, v=v, is_causal=is_causal)
                                             * v), argnums=(0, 1))(k, w)
    eps = 1e-4
    for idx in ((0, 3, 2), (1, T - 1, 5)):
        kp, km = k.astype(np.float64), k.astype(np.float64)
        kp[idx] += eps
        km[idx] -= eps
        fd = ((naive_aft(q, kp, v, w, is_causal) - naive_aft(q, km, v, w, is_causal)) * v
              ).sum() / (2 * eps)
        np.testing.assert_allclose(g_k[idx], fd, rtol=1e-3, atol=1e-5)
    wp, wm = w.astype(np.float64), w.astype(np.float64)
    wp[T - 1, 2] += eps
    wm[T - 1, 2] -= eps
    fd = ((naive_aft(q, k, v, wp, is_causal) - naive_aft(q, k, v, wm, is_causal)) * v
          ).sum() / (2 * eps)
    np.testing.assert_allclose(g_w[T - 1, 2], fd, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("name", ["simple", "full", "local"])
def test_segments_are_independent_documents(name, is_causal):
    q, k, v, w = inputs(10, k_scale=3.0)
    w = 3.0 * w
    segs = np.array([[1] * 5 + [2] * 7 + [3] * 4, [4] * 10 + [0] * 6])
    got = all_fns(w)[name](q, k, v, is_causal=is_causal, segment_ids=jnp.asarray(segs))
    wn = {"simple": np.zeros_like(w), "full": w, "local": np_local(w, 3)}[name]
    np.testing.assert_allclose(got, naive_aft(q, k, v, wn, is_causal, segs),
                               rtol=1e-5, atol=1e-6)


def test_invalid_arguments():
    q, k, v, w = inputs(11)
    with pytest.raises(ValueError, match="window"):
        aft_local(q, k, v, w, window=0)
    with pytest.raises(ValueError, match="w must be"):
        aft_full(q, k, v, w[:-1, :-1])
    with pytest.raises(ValueError, match="segment_ids"):
        aft_simple(q, k, v, segment_ids=jnp.ones((B, T - 1), jnp.int32))
    with pytest.raises(ValueError, match="variant"):
        AFT(D, variant="linear", max_len=T, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="window"):
        AFT(D, variant="local", max_len=T, rngs=nnx.Rngs(0))
    layer = AFT(D, variant="full", max_len=T - 1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        layer(jnp.asarray(q))
    with pytest.raises(ValueError, match="mask"):
        AFT(D, variant="simple", max_len=T, rngs=nnx.Rngs(0))(
            jnp.asarray(q), mask=jnp.ones((1, 1, T, T), bool))


def make_layer(variant: str, seed: int = 0, use_bias: bool = True) -> AFT:
    layer = AFT(D, variant=variant, max_len=T + 4, window=3 if variant == "local" else 0,
                use_bias=use_bias, init_std=0.5, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed + 100)
    # The table starts at zero; random entries so that the position bias is exercised.
    if layer.pos_bias is not None:
        layer.pos_bias[...] = jnp.asarray(rng.standard_normal(layer.pos_bias.shape),
                                          jnp.float32)
    for name in ("b_q", "b_k", "b_v", "b_out"):
        p = getattr(layer, name)
        if p is not None:
            p[...] = jnp.asarray(rng.standard_normal(p.shape), jnp.float32)
    return layer


@pytest.mark.parametrize("variant", ["full", "local", "simple"])
def test_module_shapes_and_matches_numpy(variant):
    fresh = AFT(D, variant=variant, max_len=T + 4, window=3 if variant == "local" else 0,
                rngs=nnx.Rngs(0))
    shapes = {k: tuple(v.shape) for k, v in nnx.to_pure_dict(nnx.state(fresh, nnx.Param))
              .items()}
    want = {n: (D, D) for n in ("w_q", "w_k", "w_v", "w_out")} | {
        n: (D,) for n in ("b_q", "b_k", "b_v", "b_out")}
    if variant != "simple":
        want["pos_bias"] = (T + 4, T + 4)
        assert not np.asarray(fresh.pos_bias[...]).any()  # zeros at init
    assert shapes == want
    x = np.random.default_rng(12).standard_normal((B, T, D)).astype(np.float32)
    layer = make_layer(variant)
    y, cache = layer(jnp.asarray(x), is_causal=True)
    assert cache is None and y.shape == (B, T, D) and y.dtype == jnp.float32
    p = {n: np.asarray(getattr(layer, n)[...], np.float64)
         for n in ("w_q", "w_k", "w_v", "w_out", "b_q", "b_k", "b_v", "b_out")}
    q, k, v = (x @ p["w_" + n] + p["b_" + n] for n in "qkv")
    w = (np.zeros((T, T)) if variant == "simple"
         else np.asarray(layer.pos_bias[...], np.float64)[:T, :T])
    w = np_local(w, 3) if variant == "local" else w
    want_y = naive_aft(q, k, v, w, is_causal=True) @ p["w_out"] + p["b_out"]
    np.testing.assert_allclose(y, want_y, rtol=1e-4, atol=1e-4)
    lowp = AFT(D, variant=variant, max_len=T, window=3 if variant == "local" else 0,
               use_bias=False, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert lowp.b_q is None and lowp(jnp.asarray(x))[0].dtype == jnp.bfloat16


@pytest.mark.parametrize("variant", ["full", "local", "simple"])
def test_module_causal_output_ignores_later_tokens(variant):
    layer = make_layer(variant, seed=1)
    rng = np.random.default_rng(13)
    x = rng.standard_normal((B, T, D)).astype(np.float32)
    x2 = x.copy()
    x2[:, 9:] = rng.standard_normal(x2[:, 9:].shape)
    y, y2 = (np.asarray(layer(jnp.asarray(a), is_causal=True,
                              segment_ids=jnp.ones((B, T), jnp.int32))[0]) for a in (x, x2))
    # Rounding only: full AFT shifts exp(K) by max_t K over the whole sequence, which the
    # later tokens change; the shift cancels in the ratio up to float32 rounding (seen: 2.4e-7
    # on an entry of 0.03, one ulp of the ~1-sized numerator and denominator).
    np.testing.assert_allclose(y[:, :9], y2[:, :9], rtol=1e-5, atol=1e-6)
    assert np.abs(y[:, 9:] - y2[:, 9:]).max() > 1e-3


# AFT-local in its O(T * window * D) form, on sequences of several blocks (blocks of
# max(window, 16) tokens), against its definition written densely: aft_full with w zeroed
# outside the window, [T, T].
TL = 56
SEGS_L = np.array([[1] * 9 + [2] * 3 + [3] * 30 + [4] * 14, [5] * TL])


def dense_local(q, k, v, w, window, is_causal=False, segment_ids=None):
    """The old aft_local, in plain jnp: softmax over t' of K_t' + w_{t,t'} (w zeroed where
    |t - t'| >= window) over the visible keys, [B, T, T, D]."""
    t = q.shape[1]
    i = jnp.arange(t)
    w = jnp.where(jnp.abs(i[:, None] - i[None, :]) < window, w, 0.0)
    visible = jnp.ones((1, t, t), bool)
    if is_causal:
        visible = visible & (i[None, :, None] >= i[None, None, :])
    if segment_ids is not None:  # each id one contiguous run here
        visible = visible & (segment_ids[:, :, None] == segment_ids[:, None, :])
    logits = jnp.where(visible[..., None], k[:, None] + w[None, :, :, None], -jnp.inf)
    mixed = jnp.sum(jax.nn.softmax(logits, axis=2) * v[:, None], axis=2)
    return jax.nn.sigmoid(q) * mixed


def local_inputs(seed, k_scale=3.0, k_shift=0.0):
    rng = np.random.default_rng(seed)
    q, k, v = (rng.standard_normal((B, TL, D)).astype(np.float32) for _ in range(3))
    w = 3.0 * rng.standard_normal((TL, TL)).astype(np.float32)
    return q, (k_scale * k + k_shift).astype(np.float32), v, w


@pytest.mark.parametrize("is_causal", [False, True])
def test_local_banded_equals_dense_definition_and_gradients(is_causal):
    q, k, v, w = local_inputs(20, k_shift=40.0)
    # window 1: blocks of 16 (4 blocks, 8 padded tokens); 17: blocks of 17 (12 padded) without
    # packing; TL + 5: one block. Blocks two or more away enter through the carried sums.
    compiled = {}
    for window, segs in ((1, SEGS_L), (17, None), (TL + 5, SEGS_L)):
        jsegs = None if segs is None else jnp.asarray(segs)

        def loss(q, k, v, w, fn, window=window, segs=jsegs):
            y = fn(q, k, v, w, window=window, is_causal=is_causal, segment_ids=segs)
            return jnp.sum(y * v), y

        grad = compiled[window] = jax.jit(
            jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True), static_argnums=4)
        (_, got), g_got = grad(q, k, v, w, aft_local)
        (_, want), g_want = grad(q, k, v, w, dense_local)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_got, g_want, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # K from -80 to 80 over time, rising and falling: a spread far beyond exp's float32 range
    # across blocks (each carried sum keeps its own max), ~50 within a block. Same shapes as
    # above: no new compile. Against the float64 loop.
    for ramp in (np.linspace(-80, 80, TL), np.linspace(80, -80, TL)):
        spread = (ramp[None, :, None] + 0.5 * (k - 40.0)).astype(np.float32)
        (_, got), _ = compiled[17](q, spread, v, w, aft_local)
        want = naive_aft(q, spread, v, np_local(w, 17), is_causal)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_local_multiblock_causal_reads_no_later_token():
    q, k, v, w = local_inputs(21)
    cut = 37  # inside a block of 16
    q2, k2, v2 = (a.copy() for a in (q, k, v))
    for a in (q2, k2, v2):
        a[:, cut + 1:] += 5.0 * np.random.default_rng(22).standard_normal(a[:, cut + 1:].shape)
    w2 = w.copy()
    w2[:, cut + 1:] += 50.0  # biases towards later keys: never read by a causal row
    fn = jax.jit(aft_local, static_argnames=("window", "is_causal"))
    y, y2 = (np.asarray(fn(*x, window=5, is_causal=True))
             for x in ((q, k, v, w), (q2, k2, v2, w2)))
    # Later tokens of the same block enter only the block's shift of K, a power of two that
    # scales numerator and denominator exactly: bit for bit the same.
    np.testing.assert_array_equal(y[:, :cut + 1], y2[:, :cut + 1])
    assert np.abs(y[:, cut + 1:] - y2[:, cut + 1:]).min() > 0
    # Non-causal, the last tokens reach the first (blocks apart: the reversed carried sum).
    y, y2 = (np.asarray(fn(*x, window=5)) for x in ((q, k, v, w), (q2, k2, v2, w)))
    assert np.abs(y[:, :16] - y2[:, :16]).min() > 0


def test_local_memory_is_linear_in_length():
    # XLA's buffer plan for the gradient (wrt q, k, v) of the summed output, batch 1, 16
    # channels, window 32, causal: temporaries grow with T, 4x for 4x the length (measured
    # 1.2 -> 4.7 MiB), where the old [T, T] form grew 16x (8.2 -> 128.8 MiB). w [T, T] is an
    # argument (64 MiB at 4096), not a temp.
    def temp_bytes(t):
        x = jax.ShapeDtypeStruct((1, t, 16), jnp.float32)
        w = jax.ShapeDtypeStruct((t, t), jnp.float32)
        grad = jax.grad(lambda q, k, v, w: jnp.sum(aft_local(q, k, v, w, window=32,
                                                             is_causal=True)),
                        argnums=(0, 1, 2))
        analysis = jax.jit(grad).lower(x, x, x, w).compile().memory_analysis()
        if analysis is None:
            pytest.skip("no memory analysis on this backend")
        return analysis.temp_size_in_bytes

    small, large = temp_bytes(1024), temp_bytes(4096)
    assert large <= 5 * small, (small, large)
    assert large < 16 * 2**20  # one [4096, 4096] float32 array alone would be 64 MiB
