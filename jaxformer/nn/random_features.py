"""Random-feature attention: Performer's FAVOR+ and RFA (with its optional gate).

Choromanski, Likhosherstov, Dohan, Song, Gane, Sarlos, Hawkins, Davis, Mohiuddin, Kaiser,
Belanger, Colwell, Weller (2021), "Rethinking Attention with Performers" (ICLR 2021), and
Peng, Pappas, Yogatama, Schwartz, Smith, Kong (2021), "Random Feature Attention" (ICLR 2021).

Letters: B batch, T query length, S key length, N query heads, K key/value heads (K divides N;
query head n reads key/value head n // G, G = N // K), H head dim, m random features (rows of
``w`` [m, H]), F features per token (m for FAVOR+, 2m for RFA), C chunk length.

Both replace softmax attention by a ratio of sums over feature maps phi:

    out_i = phi(q_i)^T S_i / phi(q_i)^T z_i,   S_i = sum_j phi(k_j) v_j^T,  z_i = sum_j phi(k_j)

with j over every key (non-causal) or over j <= i (causal, T == S).

FAVOR+ (positive orthogonal random features), x already scaled by sqrt(scale) (H**-0.25 for
the default scale) so that E[phi(q)^T phi(k)] = exp(q.k * scale):

    phi(x) = exp(w x - |x|^2 / 2) / sqrt(m),  rows of w orthogonal within blocks of H,
    each row with the norm of an independent N(0, I_H) vector (``draw_orthogonal_features``).

RFA (random Fourier features, Rahimi & Recht 2007), on l2-normalised q and k, w ~ N(0, I_H):

    phi(x) = sqrt(1/m) [sin(w x / sigma), cos(w x / sigma)],
    E[phi(q)^T phi(k)] = exp(-|q - k|^2 / (2 sigma^2)) = exp(-1/sigma^2) exp(q.k / sigma^2),

and, causal only, the gate g_t in (0, 1) per (token, kv head) (the paper's RFA-Gate):

    S_t = g_t S_{t-1} + (1 - g_t) phi(k_t) v_t^T,   z_t = g_t z_{t-1} + (1 - g_t) phi(k_t).

Causal sums are chunk-parallel: inside a chunk of C tokens the masked quadratic form
(C x C per head), across chunks the state (S and z, kept together as one [B, K, F, H + 1]
array: v with a column of ones appended) carried by ``jax.lax.scan``, so no [B, T, K, F, H]
tensor is ever built. The gate and FAVOR+'s key
stabiliser (see ``_favor_causal_keys``) are both per-token decays of the state, handled by one
routine (``_causal_sums``).

Packed documents (``segment_ids`` [B, T] int, T == S): a segment is a contiguous run of equal
ids and a token sees only its own run (equal to ``masks.segment_mask`` whenever each id is one
run, as in packing). Causal: scores across runs are masked and the carried state dropped where a
run starts. Non-causal: a causal pass plus a causal pass over the reversed sequence, minus the
diagonal counted twice.

Denominators: FAVOR+'s is a sum of positive terms, clamped below at ``eps`` (1e-6) only against
underflow. RFA's sin/cos estimate can approach 0 or go negative; as in the RFA authors' code
(``normalize_attn_weights``: ``sum.abs().clamp(1e-3)``) we divide by max(|den|, eps), eps 1e-3.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

DEFAULT_CHUNK = 64
FAVOR_EPS = 1e-6
RFA_EPS = 1e-3


def draw_orthogonal_features(key: jax.Array, m: int, h: int) -> jnp.ndarray:
    """FAVOR+'s orthogonal random features -> w [m, h] float32.

    Blocks of h mutually orthogonal rows (Q of the QR of an h x h gaussian with diag(R) > 0,
    a Haar-random rotation, so each row is uniform on the sphere), each row rescaled to the
    norm of an independent N(0, I_h) vector so every row is marginally N(0, I_h) (the estimate
    stays unbiased); the last block is truncated to m rows.
    """
    _check_feature_count(m, h)
    n_blocks = -(-m // h)
    # One normal draw for the blocks and the norms: each random.normal compiles slowly on CPU.
    g = jax.random.normal(key, (n_blocks * h + m, h), jnp.float32)
    q, r = jnp.linalg.qr(g[:n_blocks * h].reshape(n_blocks, h, h))
    # Householder QR leaves diag(R)'s signs input-dependent, which biases Q's columns (their
    # mean is not 0, and the FAVOR+ estimate is then biased). Making diag(R) > 0 makes the
    # factorisation unique, hence rotation-equivariant: Q is Haar-distributed.
    q = q * jnp.where(jnp.diagonal(r, axis1=-2, axis2=-1) < 0, -1.0, 1.0)[:, None, :]
    rows = jnp.swapaxes(q, -1, -2).reshape(n_blocks * h, h)[:m]  # unit rows
    norms = jnp.linalg.norm(g[n_blocks * h:], axis=-1)
    return rows * norms[:, None]


def draw_gaussian_features(key: jax.Array, m: int, h: int) -> jnp.ndarray:
    """m iid N(0, I_h) rows -> w [m, h] float32 (RFA's features; FAVOR+ without orthogonality)."""
    _check_feature_count(m, h)
    return jax.random.normal(key, (m, h), jnp.float32)


def _check_feature_count(m: int, h: int) -> None:
    if m < 1 or h < 1:
        raise ValueError(f"random features need m >= 1 and h >= 1; got m={m}, h={h}")


def _favor_logits(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """x [..., H], w [m, H] -> w x - |x|^2 / 2 [..., m] float32 (log of phi before 1/sqrt(m))."""
    x = x.astype(jnp.float32)
    proj = jnp.einsum("...h,mh->...m", x, w.astype(jnp.float32))
    return proj - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)


def favor_features(x: jnp.ndarray, w: jnp.ndarray, *, is_query: bool,
                   stabilize: bool = True) -> jnp.ndarray:
    """FAVOR+ positive features exp(w x - |x|^2/2 - stabiliser) / sqrt(m), float32.

    x: [B, T, heads, H], already scaled by sqrt(scale) (H**-0.25 for the default scale), so
    phi(q).phi(k) estimates exp(q.k * scale); w: [m, H] -> [B, T, heads, m].

    The stabiliser keeps exp from overflowing and is a constant of the attention ratio: for a
    query it is the max over its own m features (a per-row factor that cancels between numerator
    and denominator); for keys it is ONE max over all positions and features per (batch, head),
    as in the Performer reference code, since a per-key shift would reweight the keys against
    each other and not cancel. Because it cancels, it is held constant for gradients
    (``stop_gradient``). ``stabilize=False`` gives the raw unbiased estimator.
    """
    if x.ndim != 4 or w.ndim != 2 or x.shape[-1] != w.shape[1]:
        raise ValueError(f"favor_features takes x [B, T, heads, H] and w [m, H]; got x "
                         f"{x.shape}, w {w.shape}")
    logits = _favor_logits(x, w)
    if stabilize:
        axes = -1 if is_query else (1, 3)
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=axes, keepdims=True))
    return jnp.exp(logits) * w.shape[0] ** -0.5


def rfa_features(x: jnp.ndarray, w: jnp.ndarray, *, sigma: float = 1.0) -> jnp.ndarray:
    """RFA's random Fourier features sqrt(1/m) [sin(w x / sigma), cos(w x / sigma)], float32.

    x: [..., H] (not normalised here), w: [m, H] -> [..., 2m]; with w ~ N(0, I),
    E[phi(x).phi(y)] = exp(-|x - y|^2 / (2 sigma^2)).
    """
    proj = jnp.einsum("...h,mh->...m", x.astype(jnp.float32), w.astype(jnp.float32)) / sigma
    return jnp.concatenate([jnp.sin(proj), jnp.cos(proj)], axis=-1) * w.shape[0] ** -0.5


def _check_args(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, w: jnp.ndarray,
                is_causal: bool, segment_ids: jnp.ndarray | None, chunk: int) -> None:
    if q.ndim != 4 or k.shape != v.shape or k.ndim != 4 or k.shape[0] != q.shape[0] \
            or k.shape[3] != q.shape[3]:
        raise ValueError(f"random-feature attention expects q [B,T,N,H] and k, v [B,S,K,H]; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"key/value heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
    if w.ndim != 2 or w.shape[1] != q.shape[3]:
        raise ValueError(f"w must be [m, H] with H={q.shape[3]}; got {w.shape}")
    if chunk < 1:
        raise ValueError(f"chunk must be a positive int; got {chunk}")
    t, s = q.shape[1], k.shape[1]
    if is_causal and t != s:
        raise ValueError(f"is_causal needs self-attention (T == S); got T={t}, S={s}")
    if segment_ids is not None and (segment_ids.shape != (q.shape[0], t) or s != t):
        raise ValueError(f"segment_ids must be [B, T] with T == S; got {segment_ids.shape}, "
                         f"T={t}, S={s}")


def _run_ids(segment_ids: jnp.ndarray | None, b: int, t: int) -> jnp.ndarray:
    """[B, T] ids -> [B, T] int32 index of the contiguous run each token is in (0, 1, ...)."""
    if segment_ids is None:
        return jnp.zeros((b, t), jnp.int32)
    starts = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.zeros((b, 1), jnp.int32),
                            jnp.cumsum(starts, axis=1, dtype=jnp.int32)], axis=1)


def _run_cummax(x: jnp.ndarray, runs: jnp.ndarray) -> jnp.ndarray:
    """Running max of x [B, T, K] along T, restarted at every run start of runs [B, T]."""
    def combine(a, b):
        # Runs are contiguous and non-decreasing, so "same run as the later element" selects
        # exactly the part of the earlier prefix that belongs to the later element's run.
        (xa, ra), (xb, rb) = a, b
        return jnp.where(ra == rb, jnp.maximum(xa, xb), xb), rb

    r = jnp.broadcast_to(runs[:, :, None], x.shape)
    return jax.lax.associative_scan(combine, (x, r), axis=1)[0]


def _to_chunks(x: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """[B, T, ...] -> [T/C, B, C, ...], zero-padded at the end (padding is after every real
    token, so causally it reaches none of them)."""
    b, t = x.shape[:2]
    n = -(-t // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - t)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)


def _from_chunks(x: jnp.ndarray, t: int) -> jnp.ndarray:
    """[T/C, B, C, ...] -> [B, T, ...] (padding dropped)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


def _with_ones(v: jnp.ndarray) -> jnp.ndarray:
    """v [..., H] -> [v, 1] [..., H + 1] float32: one product then yields the numerator
    (first H channels) and the denominator (last channel) together."""
    v = v.astype(jnp.float32)
    return jnp.concatenate([v, jnp.ones((*v.shape[:-1], 1), jnp.float32)], axis=-1)


def _causal_sums(phi_q: jnp.ndarray, phi_k: jnp.ndarray, v1: jnp.ndarray,
                 log_decay: jnp.ndarray, runs: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """Decayed causal sums, chunk by chunk.

    phi_q [B, T, K, G, F], phi_k [B, T, K, F], v1 [B, T, K, H+1] (``_with_ones``), log_decay
    [B, T, K] (<= 0), runs [B, T] -> phi_q_i^T S_i [B, T, K, G, H+1], float32, with the state
    recurrence S_t = exp(log_decay_t) S_{t-1} + phi_k_t v1_t^T, restarted where a run starts.
    """
    b, t, kv, g, f = phi_q.shape
    c = min(chunk, t)
    xs = tuple(_to_chunks(x, c) for x in (phi_q, phi_k, v1, log_decay, runs))
    tril = jnp.tril(jnp.ones((c, c), bool))

    def step(carry, inputs):
        s, run_prev = carry
        pq, pk, vc, ld, rc = inputs
        # cum_i = log prod of the decays up to i in this chunk; it is non-increasing, so every
        # exponent below is <= 0 (no overflow), and differences stay within one chunk.
        cum = jnp.cumsum(ld, axis=1)  # [B, C, K]
        seen = tril & (rc[:, :, None] == rc[:, None, :])  # [B, C(i), C(j)]
        diff = cum[:, :, None, :] - cum[:, None, :, :]  # [B, i, j, K]
        decay = jnp.exp(jnp.where(seen[..., None], diff, -jnp.inf))
        scores = jnp.einsum("bikgf,bjkf->bkgij", pq, pk) * jnp.moveaxis(decay, 3, 1)[:, :, None]
        # The carried state reaches query i only if no run started since the previous chunk.
        into = jnp.exp(cum) * (rc == run_prev[:, None])[..., None]  # [B, C, K]
        out = (jnp.einsum("bkgij,bjkh->bikgh", scores, vc)
               + jnp.einsum("bikgf,bkfh->bikgh", pq, s) * into[..., None, None])
        # Decay of each key to the chunk end (0 for keys of an earlier run), and of the old
        # state (into at the last token: 0 if a run started in this chunk).
        weight = jnp.exp(cum[:, -1:] - cum) * (rc == rc[:, -1:])[..., None]  # [B, C, K]
        s = s * into[:, -1, :, None, None] + jnp.einsum("bjkf,bjkh->bkfh",
                                                       pk * weight[..., None], vc)
        return (s, rc[:, -1]), out

    init = (jnp.zeros((b, kv, f, v1.shape[-1]), jnp.float32), runs[:, 0])
    return _from_chunks(jax.lax.scan(step, init, xs)[1], t)


def _all_sums(phi_q: jnp.ndarray, phi_k: jnp.ndarray, v1: jnp.ndarray,
              segment_ids: jnp.ndarray | None, chunk: int) -> jnp.ndarray:
    """Non-causal sums over every key (of the query's run when ``segment_ids`` is given).

    phi_q [B, T, K, G, F], phi_k [B, S, K, F], v1 [B, S, K, H+1] -> [B, T, K, G, H+1].
    """
    if segment_ids is None:
        return jnp.einsum("btkgf,bkfh->btkgh", phi_q, jnp.einsum("bskf,bskh->bkfh", phi_k, v1))
    b, t = segment_ids.shape
    runs = _run_ids(segment_ids, b, t)
    no_decay = jnp.zeros(phi_k.shape[:3], jnp.float32)
    fwd = _causal_sums(phi_q, phi_k, v1, no_decay, runs, chunk)
    bwd = _causal_sums(*(jnp.flip(x, axis=1) for x in (phi_q, phi_k, v1, no_decay, runs)),
                       chunk)
    # Both passes include key i for query i: take it out once.
    self_score = jnp.einsum("btkgf,btkf->btkg", phi_q, phi_k)
    return fwd + jnp.flip(bwd, axis=1) - self_score[..., None] * v1[:, :, :, None, :]


def _favor_causal_keys(k: jnp.ndarray, w: jnp.ndarray,
                       runs: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Causal FAVOR+ key features with a causal stabiliser -> (phi_k [B, S, K, m],
    log_decay [B, S, K]).

    The reference code's one max over all keys would make token i's features depend on future
    keys (its output does not in exact arithmetic, but an early key can underflow against a
    large later one, and then the eps guard decides the result). Instead key j is shifted by
    M_j, the running max of its run's logits up to j; the state is kept at scale exp(-M_t) by
    decaying it by exp(M_{t-1} - M_t) <= 1 at each step, so query i sees every key j <= i at
    the common scale exp(-M_i): the shift cancels exactly, and nothing depends on keys after i.
    """
    logits = _favor_logits(k, w)  # [B, S, K, m]
    shift = jax.lax.stop_gradient(_run_cummax(jnp.max(logits, axis=-1), runs))  # [B, S, K]
    phi_k = jnp.exp(logits - shift[..., None]) * w.shape[0] ** -0.5
    same_run = (runs[:, 1:] == runs[:, :-1])[..., None]
    # 0 where a run starts: the state is dropped there anyway, and the shift may go down.
    step = jnp.where(same_run, shift[:, :-1] - shift[:, 1:], 0.0)
    log_decay = jnp.concatenate([jnp.zeros_like(shift[:, :1]), step], axis=1)
    return phi_k, log_decay


def favor_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, w: jnp.ndarray, *,
                    is_causal: bool = False, scale: float | None = None,
                    segment_ids: jnp.ndarray | None = None,
                    chunk: int = DEFAULT_CHUNK, eps: float = FAVOR_EPS) -> jnp.ndarray:
    """Performer FAVOR+ attention, estimating softmax(q k^T * scale) v.

    q: [B, T, N, H], k, v: [B, S, K, H], w: [m, H] (``draw_orthogonal_features``);
    ``is_causal`` (T == S): key j <= query i; ``segment_ids`` [B, T]: own run only;
    ``chunk``: causal chunk length C (any C >= 1; T need not be a multiple) -> [B, T, N, H]
    in q's dtype. scale None means H**-0.5, applied as sqrt(scale) on each of q and k.
    """
    _check_args(q, k, v, w, is_causal, segment_ids, chunk)
    b, t, n, h = q.shape
    kv = k.shape[2]
    root = math.sqrt(h**-0.5 if scale is None else scale)
    phi_q = favor_features(q.astype(jnp.float32) * root, w, is_query=True)
    phi_q = phi_q.reshape(b, t, kv, n // kv, -1)
    ks, v1 = k.astype(jnp.float32) * root, _with_ones(v)
    if is_causal:
        runs = _run_ids(segment_ids, b, t)
        phi_k, log_decay = _favor_causal_keys(ks, w, runs)
        sums = _causal_sums(phi_q, phi_k, v1, log_decay, runs, chunk)
    else:
        sums = _all_sums(phi_q, favor_features(ks, w, is_query=False), v1, segment_ids, chunk)
    out = sums[..., :h] / jnp.maximum(sums[..., h:], eps)  # den > 0: eps only for underflow
    return out.reshape(b, t, n, h).astype(q.dtype)


def _l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
    """x / |x| over the last axis, float32; the tiny floor keeps x = 0 (and its gradient)
    finite."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def rfa_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, w: jnp.ndarray, *,
                  is_causal: bool = False, gate: jnp.ndarray | None = None,
                  sigma: float = 1.0, segment_ids: jnp.ndarray | None = None,
                  chunk: int = DEFAULT_CHUNK, eps: float = RFA_EPS) -> jnp.ndarray:
    """RFA: random Fourier features on l2-normalised q and k (Gaussian kernel of width sigma,
    i.e. softmax attention with temperature sigma^2 on unit vectors).

    q: [B, T, N, H], k, v: [B, S, K, H], w: [m, H] (``draw_gaussian_features``);
    ``gate`` [B, T, K] in (0, 1) (RFA-Gate; causal only): S_t = g_t S_{t-1} + (1 - g_t)
    phi(k_t) v_t^T, z likewise; ``segment_ids`` [B, T]: own run only; ``chunk``: causal chunk
    length -> [B, T, N, H] in q's dtype, out = phi(q) S / max(|phi(q) z|, eps).
    """
    _check_args(q, k, v, w, is_causal, segment_ids, chunk)
    if isinstance(sigma, int | float) and not sigma > 0:  # a traced sigma is not checked
        raise ValueError(f"sigma must be > 0; got {sigma}")
    b, t, n, h = q.shape
    kv = k.shape[2]
    if gate is not None and not is_causal:
        raise ValueError("gate (RFA-Gate) is a recurrence: it needs is_causal=True")
    if gate is not None and gate.shape != (b, t, kv):
        raise ValueError(f"gate must be [B, T, K] = {(b, t, kv)}; got {gate.shape}")
    phi_q = rfa_features(_l2_normalize(q), w, sigma=sigma).reshape(b, t, kv, n // kv, -1)
    phi_k = rfa_features(_l2_normalize(k), w, sigma=sigma)
    v1 = _with_ones(v)
    if is_causal:
        if gate is None:
            log_decay = jnp.zeros((b, t, kv), jnp.float32)
        else:
            g = gate.astype(jnp.float32)
            # A gate that rounded to exactly 0 would give log 0 = -inf and inf - inf = NaN in
            # the chunk's decay differences; the floor keeps it finite (decay ~ 1e-38).
            log_decay = jnp.log(jnp.clip(g, jnp.finfo(jnp.float32).tiny, 1.0))
            phi_k = phi_k * (1.0 - g)[..., None]
        sums = _causal_sums(phi_q, phi_k, v1, log_decay, _run_ids(segment_ids, b, t), chunk)
    else:
        sums = _all_sums(phi_q, phi_k, v1, segment_ids, chunk)
    # sin/cos estimates can make den ~ 0 or < 0: divide by max(|den|, eps) as the RFA code does.
    out = sums[..., :h] / jnp.maximum(jnp.abs(sums[..., h:]), eps)
    return out.reshape(b, t, n, h).astype(q.dtype)
