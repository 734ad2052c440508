"""Performer FAVOR+ and RFA: unbiased kernel estimates, convergence to softmax attention, the
chunked causal/segmented sums against naive float64 numpy, causality, gradients, arguments."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxformer.nn.attention_kernels import reference_attention
from jaxformer.nn.random_features import (
    draw_gaussian_features,
    draw_orthogonal_features,
    favor_attention,
    favor_features,
    rfa_attention,
    rfa_features,
)

B, T, N, K, H = 2, 19, 4, 2, 8  # grouped heads; T = 19 is no multiple of the chunks below
CHUNK = 5
# Two packed documents then padding in row 0, one document in row 1.
SEGMENTS = np.array([[1] * 7 + [2] * 8 + [0] * 4, [3] * T])

# Compiling dominates this file's time: every attention call goes through one of these two
# jitted wrappers, so each configuration compiles once and is shared between tests.


@functools.partial(jax.jit, static_argnames=("is_causal",))
def _favor(q, k, v, w, segment_ids=None, *, is_causal):
    return favor_attention(q, k, v, w, is_causal=is_causal, segment_ids=segment_ids, chunk=CHUNK)


@functools.partial(jax.jit, static_argnames=("is_causal", "sigma"))
def _rfa(q, k, v, w, gate=None, segment_ids=None, *, is_causal, sigma=1.0):
    return rfa_attention(q, k, v, w, is_causal=is_causal, gate=gate, sigma=sigma,
                         segment_ids=segment_ids, chunk=CHUNK)


def _qkv(seed: int, t: int = T, n: int = N, kv: int = K, norm: float = 1.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, t, n, H)) * norm
    k = rng.normal(size=(B, t, kv, H)) * norm
    v = rng.normal(size=(B, t, kv, H))
    return tuple(jnp.asarray(x, jnp.float32) for x in (q, k, v))


def _w(seed: int, m: int = 16):
    """Features for the tests of the attention sums, which hold for any w [m, H]: drawn in
    numpy, since every jax.random program takes about a second to compile here."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=(m, H)), jnp.float32)


def _np_favor(x, w):
    """exp(w x - |x|^2 / 2) / sqrt(m) in float64, unstabilised (any shift cancels in a ratio)."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    return np.exp(x @ w.T - 0.5 * np.sum(x * x, -1, keepdims=True)) / np.sqrt(len(w))


def _np_rfa(x, w, sigma=1.0):
    """sqrt(1/m) [sin, cos](w x / sigma) of the unit vector x / |x|, float64."""
    x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
    u = (x / np.linalg.norm(x, axis=-1, keepdims=True)) @ w.T / sigma
    return np.concatenate([np.sin(u), np.cos(u)], -1) / np.sqrt(len(w))


def _mask(t: int, is_causal: bool, segments: np.ndarray | None) -> np.ndarray:
    """[B, T, S] bool: who may attend to whom."""
    mask = np.ones((B, t, t), bool)
    if is_causal:
        mask &= np.tril(np.ones((t, t), bool))
    if segments is not None:
        mask &= segments[:, :, None] == segments[:, None, :]
    return mask


def _naive_ratio(phi_q, phi_k, v, mask, guard=lambda d: d):
    """out[b, i, n] = sum_j A_ij v_j / guard(sum_j A_ij), A_ij = phi_q_i . phi_k_j over the
    visible j, one (batch, head, query) at a time in float64; head n reads kv head n // G."""
    phi_q, phi_k, v = (np.asarray(x, np.float64) for x in (phi_q, phi_k, v))
    b, t, n, _ = phi_q.shape
    groups = n // phi_k.shape[2]
    out = np.zeros((b, t, n, v.shape[-1]))
    for bi in range(b):
        for ni in range(n):
            kv = ni // groups
            for i in range(t):
                j = np.flatnonzero(mask[bi, i])
                a = phi_k[bi, j, kv] @ phi_q[bi, i, ni]
                out[bi, i, ni] = a @ v[bi, j, kv] / guard(a.sum())
    return out


def _rfa_guard(d):
    return max(abs(d), 1e-3)


def _within_4_se(samples, target):
    samples = np.asarray(samples, np.float64)
    se = samples.std(ddof=1) / np.sqrt(samples.size)
    assert abs(samples.mean() - target) < 4 * se, (samples.mean(), target, se)


Q_VEC = np.array([0.3, -0.2, 0.25, 0.2])  # H = 4, norms ~0.5
K_VEC = np.array([-0.1, 0.35, 0.2, -0.3])


@jax.jit
def _kernel_estimates(keys):
    """One estimate per key and feature kind: (FAVOR+ orthogonal, FAVOR+ iid, RFA orthogonal,
    RFA iid) of the (unstabilised) features' dot product for Q_VEC, K_VEC with m = 8."""
    def one(key):
        out = []
        for draw in (draw_orthogonal_features, draw_gaussian_features):
            w = draw(key, 8, 4)
            phi_q, phi_k = (favor_features(x[None, None, None], w, is_query=is_query,
                                           stabilize=False)
                            for x, is_query in ((Q_VEC, True), (K_VEC, False)))
            out.append((jnp.sum(phi_q * phi_k), rfa_features(Q_VEC, w) @ rfa_features(K_VEC, w)))
        return [out[0][0], out[1][0], out[0][1], out[1][1]]
    return jax.vmap(one)(keys)


def test_kernel_estimates_are_unbiased():
    favor_orth, favor_iid, rfa_orth, rfa_iid = _kernel_estimates(
        jax.random.split(jax.random.key(0), 2000))
    softmax_kernel = np.exp(Q_VEC @ K_VEC)
    gaussian_kernel = np.exp(-np.sum((Q_VEC - K_VEC) ** 2) / 2)
    for samples, target in ((favor_orth, softmax_kernel), (favor_iid, softmax_kernel),
                            (rfa_orth, gaussian_kernel), (rfa_iid, gaussian_kernel)):
        _within_4_se(samples, target)


def test_favor_error_shrinks_with_more_features():
    q, k, v = _qkv(2, t=32, n=2, kv=2, norm=0.5)

    @jax.jit
    def mean_errors(key):  # one program (each jax.random program compiles slowly here)
        exact = reference_attention(q, k, v)

        def errors(key):
            # The first 16 rows of a 256-row draw are a 16-row draw (two whole blocks).
            w = draw_orthogonal_features(key, 256, H)
            return [jnp.mean(jnp.abs(favor_attention(q, k, v, w[:m]) - exact))
                    for m in (16, 256)]
        return jnp.mean(jnp.stack(jax.vmap(errors)(jax.random.split(key, 8))), axis=1)

    small, large = (float(e) for e in mean_errors(jax.random.key(3)))
    assert small > 2 * large, (small, large)


@pytest.mark.parametrize(("is_causal", "segmented"), [(True, True), (False, False),
                                                      (False, True)])
def test_favor_matches_naive_quadratic_form(is_causal, segmented):
    # Causal runs segmented only: row 1 of SEGMENTS is a single document, i.e. unsegmented.
    q, k, v = _qkv(4)
    w = _w(4)
    segments = SEGMENTS if segmented else None
    out = _favor(q, k, v, w, None if segments is None else jnp.asarray(segments),
                 is_causal=is_causal)
    root = H**-0.25
    want = _naive_ratio(_np_favor(q * root, w), _np_favor(k * root, w), v,
                        _mask(T, is_causal, segments))
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-5)


def _rfa_recurrence(q, k, v, w, gate, segments):
    """RFA(-Gate) as the paper's loop: S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T (without
    a gate: S_t = S_{t-1} + phi(k_t) v_t^T), state dropped where a segment starts; float64."""
    phi_q, phi_k, v = _np_rfa(q, w), _np_rfa(k, w), np.asarray(v, np.float64)
    groups = N // K
    out = np.zeros(q.shape)
    for bi in range(B):
        for kv in range(K):
            s = np.zeros((phi_k.shape[-1], H))
            z = np.zeros(phi_k.shape[-1])
            for t in range(T):
                if segments is not None and t > 0 and segments[bi, t] != segments[bi, t - 1]:
                    s, z = np.zeros_like(s), np.zeros_like(z)
                g, wk = (1.0, 1.0) if gate is None else (gate[bi, t, kv], 1 - gate[bi, t, kv])
                s = g * s + wk * np.outer(phi_k[bi, t, kv], v[bi, t, kv])
                z = g * z + wk * phi_k[bi, t, kv]
                for ni in range(kv * groups, (kv + 1) * groups):
                    out[bi, t, ni] = phi_q[bi, t, ni] @ s / _rfa_guard(phi_q[bi, t, ni] @ z)
    return out


@pytest.mark.parametrize("gated", [False, True])
def test_rfa_causal_matches_recurrence(gated):
    # The gated run is also segmented (row 1 of SEGMENTS is a single document).
    q, k, v = _qkv(5)
    w = _w(5)
    gate = np.random.default_rng(5).uniform(0.05, 0.95, size=(B, T, K)) if gated else None
    segments = SEGMENTS if gated else None
    out = _rfa(q, k, v, w, None if gate is None else jnp.asarray(gate, jnp.float32),
               None if segments is None else jnp.asarray(segments), is_causal=True)
    want = _rfa_recurrence(np.asarray(q), np.asarray(k), v, w, gate, segments)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-4)


def test_rfa_bidirectional_matches_naive():
    q, k, v = _qkv(6)
    w = _w(6)
    out = _rfa(q, k, v, w, is_causal=False, sigma=0.8)
    want = _naive_ratio(_np_rfa(q, w, 0.8), _np_rfa(k, w, 0.8), v, _mask(T, False, None),
                        guard=_rfa_guard)
    np.testing.assert_allclose(np.asarray(out), want, rtol=2e-4, atol=2e-4)


def test_causal_leaks_no_future_token():
    q, k, v = _qkv(7)
    w = _w(7)
    gate = np.random.default_rng(7).uniform(0.1, 0.9, size=(B, T, K))
    one_document = jnp.zeros((B, T), jnp.int32)
    p = 8  # outputs 0..p must not move when tokens p+1.. change
    q2, k2, v2 = (np.array(x) for x in (q, k, v))
    for x, y in zip((q2, k2, v2), _qkv(8), strict=True):
        x[:, p + 1:] = 3 * np.asarray(y)[:, p + 1:]
    # The key that maximises w_r.x - |x|^2/2 (x = w_r): the largest logit any key can have,
    # which would move a stabiliser taken over all keys.
    w_np = np.asarray(w)
    k2[:, p + 1] = w_np[np.argmax(np.sum(w_np**2, axis=-1))] / H**-0.25
    gate2 = gate.copy()
    gate2[:, p + 1:] = 0.99
    q2, k2, v2, gate, gate2 = (jnp.asarray(x, jnp.float32) for x in (q2, k2, v2, gate, gate2))
    for before, after in (
            (_favor(q, k, v, w, one_document, is_causal=True),
             _favor(q2, k2, v2, w, one_document, is_causal=True)),
            (_rfa(q, k, v, w, gate, one_document, is_causal=True),
             _rfa(q2, k2, v2, w, gate2, one_document, is_causal=True))):
        np.testing.assert_allclose(np.asarray(after[:, :p + 1]), np.asarray(before[:, :p + 1]),
                                   rtol=1e-6, atol=1e-6)
        assert not np.allclose(np.asarray(after[:, p + 1:]), np.asarray(before[:, p + 1:]))


def test_favor_gradients_match_dense_and_rfa_gradients_are_finite():
    q, k, v = _qkv(9)
    w = _w(9)
    segments = jnp.asarray(SEGMENTS)
    gate = jnp.full((B, T, K), 0.5)
    probe = jnp.asarray(np.random.default_rng(9).normal(size=(B, T, N, H)), jnp.float32)
    mask = jnp.asarray(_mask(T, True, SEGMENTS))[:, None]  # [B, 1, T, S]

    def features(x):  # unstabilised: the inputs are small, and a shift cancels anyway
        x = x * H**-0.25
        return jnp.exp(x @ w.T - 0.5 * jnp.sum(x * x, -1, keepdims=True))

    def dense(q, k, v):  # the same estimator as one masked [T, S] matrix per head
        a = jnp.einsum("btnm,bsnm->bnts", features(q),
                       jnp.repeat(features(k), N // K, axis=2)) * mask
        out = jnp.einsum("bnts,bsnh->btnh", a, jnp.repeat(v, N // K, axis=2))
        return out / jnp.moveaxis(a.sum(-1), 1, 2)[..., None]

    def loss(fn):
        return lambda *args: jnp.sum(fn(*args) * probe)

    @jax.jit
    def grads(q, k, v, gate):
        favor = functools.partial(favor_attention, w=w, is_causal=True, segment_ids=segments,
                                  chunk=CHUNK)
        rfa = functools.partial(rfa_attention, w=w, is_causal=True, segment_ids=segments,
                                chunk=CHUNK)
        return (jax.grad(loss(lambda q, k, v: favor(q, k, v)), argnums=(0, 1, 2))(q, k, v),
                jax.grad(loss(dense), argnums=(0, 1, 2))(q, k, v),
                jax.grad(loss(lambda q, k, v, g: rfa(q, k, v, gate=g)),
                         argnums=(0, 1, 2, 3))(q, k, v, gate))

    got, want, rfa_grads = grads(q, k, v, gate)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=2e-3, atol=2e-4)
    for g in rfa_grads:
        assert np.all(np.isfinite(np.asarray(g))) and np.any(np.asarray(g) != 0)


def test_orthogonal_features_are_orthogonal_within_blocks():
    h, m = 8, 4092  # 511 full blocks and a last one truncated to 4 rows
    w = np.asarray(jax.jit(draw_orthogonal_features, static_argnums=(1, 2))(
        jax.random.key(10), m, h), np.float64)
    assert w.shape == (m, h)
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    full = unit[:m - m % h].reshape(-1, h, h)
    np.testing.assert_allclose(full @ full.transpose(0, 2, 1), np.broadcast_to(np.eye(h),
                               full.shape), atol=1e-5)
    last = unit[m - m % h:]
    np.testing.assert_allclose(last @ last.T, np.eye(m % h), atol=1e-5)
    # Rows carry chi(h) norms, not unit or equal ones: E|w_r|^2 = h (within 4 standard errors).
    _within_4_se(np.sum(w**2, axis=1), h)


def test_bfloat16_in_bfloat16_out():
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(12))
    w = _w(12)
    assert _favor(q, k, v, w, is_causal=False).dtype == jnp.bfloat16


def test_invalid_arguments_raise():
    q, k, v = _qkv(13)
    w = _w(13)
    with pytest.raises(ValueError, match="chunk"):
        favor_attention(q, k, v, w, is_causal=True, chunk=0)
    with pytest.raises(ValueError, match="is_causal"):
        favor_attention(q, k[:, :10], v[:, :10], w, is_causal=True)
    with pytest.raises(ValueError, match="must divide"):
        favor_attention(q, k[:, :, :1].repeat(3, axis=2), v[:, :, :1].repeat(3, axis=2), w)
    with pytest.raises(ValueError, match="w must be"):
        rfa_attention(q, k, v, w[:, :4])
    with pytest.raises(ValueError, match="segment_ids"):
        rfa_attention(q, k, v, w, segment_ids=jnp.zeros((B, T + 1), jnp.int32))
    with pytest.raises(ValueError, match="gate"):
        rfa_attention(q, k, v, w, gate=jnp.full((B, T, K), 0.5))
    with pytest.raises(ValueError, match="gate"):
        rfa_attention(q, k, v, w, is_causal=True, gate=jnp.full((B, T, N), 0.5))
    with pytest.raises(ValueError, match="sigma"):
        rfa_attention(q, k, v, w, sigma=0.0)
    with pytest.raises(ValueError, match="m >= 1"):
        draw_orthogonal_features(jax.random.key(0), 0, H)
