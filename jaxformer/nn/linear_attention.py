"""Linear attention with the elu + 1 feature map, chunk-parallel training and O(1) decoding.

Katharopoulos, Vyas, Pappas, Fleuret (2020), "Transformers are RNNs: Fast Autoregressive
Transformers with Linear Attention" (ICML 2020). With the feature map
``phi(x) = elu(x) + 1`` (positive, so every denominator is > 0), query token i gets

    out_i = phi(q_i)^T S_i / (phi(q_i)^T z_i + eps),
    S_i = sum_j phi(k_j) v_j^T  [H, Hv],   z_i = sum_j phi(k_j)  [H],

where j runs over all keys (non-causal) or over j <= i (causal). There is no softmax and no
``1/sqrt(H)`` scale: a scale on q cancels between numerator and denominator up to ``eps``.

Letters: B batch, T query length, S key length, N query heads, K key/value heads (K divides N;
query head n reads key/value head n // G with G = N // K), H head dim, Hv value head dim (H in
the rest of the codebase), C chunk length.

Causal training uses the chunk-parallel form: inside a chunk of C tokens the masked quadratic
form ``tril(phi(Q) phi(K)^T) V`` (C x C per head), across chunks the running sums (S, z) are
carried by ``jax.lax.scan``, so nothing of size [B, T, K, H, Hv] is ever materialised (the scan
keeps one [B, K, H, Hv] state per chunk for the backward pass). Decoding carries the same (S, z)
as a fixed-size ``LinearState`` instead of a KV cache.

Packed documents (``segment_ids`` [B, T] int): a segment is a contiguous run of equal ids, and a
token sees only the tokens of its own run. This equals the codebase's equality mask
(``masks.segment_mask``) whenever each id occupies a single run, as in packing (documents one
after another, trailing padding). Causal: the carried state is dropped where a run starts and
scores across runs are masked inside a chunk. Non-causal: exact per-run sums, computed as a
causal pass (diagonal included) plus a causal pass over the reversed sequence (diagonal
excluded), so no one-hot over segment ids and no limit on the number of segments.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp


class LinearState(NamedTuple):
    """Fixed-size decoding state: s [B, K, H, Hv] = sum phi(k) v^T, z [B, K, H] = sum phi(k)."""

    s: jnp.ndarray
    z: jnp.ndarray


def init_linear_state(batch: int, kv_heads: int, head_dim: int, v_dim: int) -> LinearState:
    """An empty state (no tokens seen): s zeros [B, K, H, Hv], z zeros [B, K, H], float32."""
    return LinearState(s=jnp.zeros((batch, kv_heads, head_dim, v_dim), jnp.float32),
                       z=jnp.zeros((batch, kv_heads, head_dim), jnp.float32))


def feature_map(x: jnp.ndarray) -> jnp.ndarray:
    """phi(x) = elu(x) + 1 in float32, elementwise (> 0 everywhere)."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def _check_shapes(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"linear attention expects q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv]; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[:3] != v.shape[:3] or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3]:
        raise ValueError(f"linear attention expects q [B,T,N,H], k [B,S,K,H], v [B,S,K,Hv]; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"key/value heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")


def _group(phi_q: jnp.ndarray, kv_heads: int) -> jnp.ndarray:
    """[B, T, N, H] -> [B, T, K, G, H]: query head n = k * G + g reads key/value head k."""
    b, t, n, h = phi_q.shape
    return phi_q.reshape(b, t, kv_heads, n // kv_heads, h)


def _run_ids(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """[B, T] segment ids -> [B, T] int32 index of the contiguous run each token belongs to."""
    starts = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], dtype=jnp.int32),
                              (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)],
                             axis=1)
    return jnp.cumsum(starts, axis=1)


def _pad_time(x: jnp.ndarray, pad: int, mode: str = "constant") -> jnp.ndarray:
    """Pad axis 1 (time) at the end by ``pad`` steps."""
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, mode=mode)


def _to_chunks(x: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """[B, T, ...] with T % C == 0 -> [T // C, B, C, ...], the leading axis scanned over."""
    b, t = x.shape[:2]
    return jnp.moveaxis(x.reshape(b, t // chunk, chunk, *x.shape[2:]), 1, 0)


def _from_chunks(x: jnp.ndarray) -> jnp.ndarray:
    """[T // C, B, C, ...] -> [B, T, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _causal_sums(phi_q: jnp.ndarray, phi_k: jnp.ndarray, v: jnp.ndarray, run: jnp.ndarray,
                 state: LinearState, *, chunk: int, include_diag: bool = True,
                 ) -> tuple[jnp.ndarray, jnp.ndarray, LinearState]:
    """Chunk-parallel causal numerator and denominator, starting from ``state``.

    phi_q [B, T, K, G, H], phi_k [B, T, K, H], v [B, T, K, Hv] (float32), run [B, T] int32
    (non-decreasing or non-increasing run index: a token sees earlier tokens of its own run)
    -> num [B, T, K, G, Hv] = phi(q_i)^T S_i, den [B, T, K, G] = phi(q_i)^T z_i, and the state
    after the last token (the sums over the last token's run, plus ``state`` if that run is the
    first one). ``include_diag`` False gives the strictly causal sums (j < i).
    """
    t, hv = phi_q.shape[1], v.shape[-1]
    pad = -t % chunk
    # A column of ones appended to v makes z ride along with S: one einsum gives both the
    # numerator (first Hv columns) and the denominator (last column).
    v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # [B, T, K, Hv + 1]
    # Padding sits after every real token, so causality keeps it out of the real outputs; phi(k)
    # and v are padded with zeros (not phi(0) = 1) so the returned state is exact too, and the
    # run index is padded with the last run so the state is not reset by the padding.
    phi_q, phi_k, v = (_pad_time(x, pad) for x in (phi_q, phi_k, v))
    run = _pad_time(run, pad, mode="edge")
    xs = tuple(_to_chunks(x, chunk) for x in (phi_q, phi_k, v, run))
    tri = jnp.tril(jnp.ones((chunk, chunk), bool), k=0 if include_diag else -1)  # [C(i), C(j)]

    def step(carry, x):
        sz, carry_run = carry  # [B, K, H, Hv + 1] = [S | z], [B]: the run S and z belong to
        cq, ck, cv, crun = x  # [B, C, K, G, H], [B, C, K, H], [B, C, K, Hv + 1], [B, C]
        same = tri[None] & (crun[:, :, None] == crun[:, None, :])  # [B, C, C]
        scores = jnp.einsum("bikgh,bjkh->bkgij", cq, ck) * same[:, None, None]
        out = jnp.einsum("bkgij,bjkv->bikgv", scores, cv)
        # The carried sums belong to the run of the previous chunk's last token; only queries
        # of that same run may read them.
        sees_carry = (crun == carry_run[:, None]).astype(jnp.float32)  # [B, C]
        out += jnp.einsum("bikgh,bkhv->bikgv", cq, sz) * sees_carry[:, :, None, None, None]
        # New carry: the sums over the run of this chunk's last token. Runs are contiguous, so
        # that run is a suffix of the chunk, and it continues the old carry iff it is the same run.
        last_run = crun[:, -1]
        keep = (last_run == carry_run).astype(jnp.float32)  # [B]
        in_last = (crun == last_run[:, None]).astype(jnp.float32)  # [B, C]
        sz = sz * keep[:, None, None, None] + jnp.einsum("bjkh,bjkv,bj->bkhv", ck, cv, in_last)
        return (sz, last_run), out

    init = (jnp.concatenate([state.s, state.z[..., None]], axis=-1), run[:, 0])
    (sz, _), out = jax.lax.scan(step, init, xs)
    out = _from_chunks(out)[:, :t]
    return out[..., :hv], out[..., hv], LinearState(s=sz[..., :hv], z=sz[..., hv])


def _finish(num: jnp.ndarray, den: jnp.ndarray, eps: float, dtype: jnp.dtype) -> jnp.ndarray:
    """num [B, T, K, G, Hv], den [B, T, K, G] -> out [B, T, N, Hv] in ``dtype``."""
    out = num / (den[..., None] + eps)
    b, t, kh, g, hv = out.shape
    return out.reshape(b, t, kh * g, hv).astype(dtype)


# jit here (shapes and flags static) because eager mode retraces the chunk scan on every call;
# inside a caller's jit this is simply inlined.
@functools.partial(jax.jit, static_argnames=("is_causal", "eps", "chunk"))
def linear_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                     is_causal: bool = False, segment_ids: jnp.ndarray | None = None,
                     eps: float = 1e-6, chunk: int = 64) -> jnp.ndarray:
    """Linear attention (elu + 1 features) over a whole sequence.

    q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], segment_ids [B, T] int or None
    -> [B, T, N, Hv] in q's dtype (sums and division in float32). ``is_causal`` and
    ``segment_ids`` need T == S. ``chunk`` (C) is the causal block length: cost O(T C H + T H Hv)
    per head, T need not be a multiple of C.
    """
    _check_shapes(q, k, v)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    b, t = q.shape[:2]
    if (is_causal or segment_ids is not None) and k.shape[1] != t:
        raise ValueError(f"is_causal and segment_ids need T == S; got T={t}, S={k.shape[1]}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T] = {(b, t)}, got {segment_ids.shape}")
    kv_heads, hv = k.shape[2], v.shape[3]
    phi_q = _group(feature_map(q), kv_heads)
    phi_k = feature_map(k)
    v32 = v.astype(jnp.float32)

    if not is_causal and segment_ids is None:
        s = jnp.einsum("bskh,bskv->bkhv", phi_k, v32)
        z = jnp.sum(phi_k, axis=1)
        num = jnp.einsum("btkgh,bkhv->btkgv", phi_q, s)
        den = jnp.einsum("btkgh,bkh->btkg", phi_q, z)
        return _finish(num, den, eps, q.dtype)

    chunk = min(chunk, t)  # a chunk longer than the sequence would only compute padding
    run = (jnp.zeros((b, t), jnp.int32) if segment_ids is None else _run_ids(segment_ids))
    zero = init_linear_state(b, kv_heads, k.shape[3], hv)
    num, den, _ = _causal_sums(phi_q, phi_k, v32, run, zero, chunk=chunk)
    if not is_causal:
        # Per-run non-causal sums = keys j <= i (above) + keys j > i, the latter being the
        # strictly causal sums of the time-reversed sequence.
        rev = [jnp.flip(x, axis=1) for x in (phi_q, phi_k, v32, run)]
        num_r, den_r, _ = _causal_sums(*rev, zero, chunk=chunk, include_diag=False)
        num = num + jnp.flip(num_r, axis=1)
        den = den + jnp.flip(den_r, axis=1)
    return _finish(num, den, eps, q.dtype)


@functools.partial(jax.jit, static_argnames=("eps",))
def linear_attention_step(state: LinearState, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                          *, eps: float = 1e-6, valid: jnp.ndarray | None = None
                          ) -> tuple[jnp.ndarray, LinearState]:
    """Recurrent (decoding) form: T new tokens attend causally to the state and to each other.

    state s [B, K, H, Hv], z [B, K, H]; q [B, T, N, H], k [B, T, K, H], v [B, T, K, Hv]
    -> (out [B, T, N, Hv] in q's dtype, the state after the T tokens). T = 1 when decoding,
    T > 1 for a prompt (processed in chunks of up to 64 tokens); the state size does not grow.
    valid: [B, T] bool, the tokens that join the state (None: all); the others (a batch's left
    padding) add nothing to it, and their outputs are meaningless.
    """
    _check_shapes(q, k, v)
    b, t, _, h = q.shape
    kv_heads, hv = k.shape[2], v.shape[3]
    if k.shape[1] != t:
        raise ValueError(f"linear_attention_step needs as many new keys as queries; got "
                         f"T={t}, S={k.shape[1]}")
    if state.s.shape != (b, kv_heads, h, hv) or state.z.shape != (b, kv_heads, h):
        raise ValueError(f"state must be s [B,K,H,Hv] = {(b, kv_heads, h, hv)} and z [B,K,H]; "
                         f"got s {state.s.shape}, z {state.z.shape}")
    state = LinearState(s=state.s.astype(jnp.float32), z=state.z.astype(jnp.float32))
    phi_q = _group(feature_map(q), kv_heads)
    run = jnp.zeros((b, t), jnp.int32)
    phi_k = feature_map(k)
    if valid is not None:  # phi > 0 everywhere: zeroing it is what keeps a token out
        phi_k = phi_k * valid[:, :, None, None].astype(phi_k.dtype)
    num, den, state = _causal_sums(phi_q, phi_k, v.astype(jnp.float32), run, state,
                                   chunk=min(t, 64))
    return _finish(num, den, eps, q.dtype), state
