"""LSH attention from Reformer, with the shared query/key projection.

Kitaev, Kaiser and Levskaya (2020), "Reformer: The Efficient Transformer" (ICLR 2020).

Letters: B batch, T length, N heads, H head dim, R hash rounds (``n_hashes``), U buckets
(``n_buckets``), C chunks over all rounds (R·T / ``chunk``), c = ``chunk``.

Queries are the shared projection ``qk`` as is; keys are its l2-normalised rows
``k_j = qk_j / |qk_j|``. Per round r a random rotation ``R_r`` [H, U/2] hashes each key to
``h_r(j) = argmax([k_j R_r, -k_j R_r])`` (angular LSH, section 2 of the paper). Positions are
sorted by (round, bucket, position), the sorted order is cut into chunks of c, and each chunk
attends to itself and the chunk before it (look-one-back, wrapping around, as trax does).
Within those 2c keys query i scores key j as

    s_ij = scale · qk_i · k_j - log n_ij,       scale = H^-0.5 by default,

with ``s_ii = -1e5`` (a token attends to itself only when nothing else is visible), ``s_ij =
-1e9`` for j > i when causal, and n_ij the number of times the pair (i, j) appears across all
rounds' key lists (look-back can list a key twice in one round; two rounds can both list it).
Each round gives ``o_r(i) = softmax_j(s_ij) v`` with normaliser ``L_r(i) = logsumexp_j s_ij``,
and the rounds combine as

    o(i) = sum_r softmax_r(L_r(i)) · o_r(i),

which, thanks to the -log n_ij term, is exactly softmax attention over the union of the keys
met in any round, each counted once (the paper's eq. 4-6 with trax's duplicate correction).
Memory is O(R · T · 2c) scores per head; no [T, T] array is ever built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Score of a token for itself (the paper, section 2, "shared-QK attention"): low enough to
# vanish next to any real key, but finite and above the causal mask, so a token with no other
# visible key attends to itself instead of to a masked future token.
SELF_MASK_VALUE = -1e5
# Score of a hidden (future) key under the causal mask, as in trax.
CAUSAL_MASK_VALUE = -1e9


def _check_args(qk: jax.Array, v: jax.Array, n_hashes: int, n_buckets: int,
                chunk: int) -> None:
    if qk.ndim != 4 or qk.shape != v.shape:
        raise ValueError(f"lsh_attention expects qk and v [B, T, N, H] of one shape; got "
                         f"qk {qk.shape}, v {v.shape}")
    if n_hashes < 1:
        raise ValueError(f"n_hashes must be a positive int; got {n_hashes}")
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"n_buckets must be an even int >= 2; got {n_buckets}")
    t = qk.shape[1]
    if chunk < 1 or t % chunk:
        raise ValueError(f"chunk must be a positive divisor of T={t}; got {chunk}")


def hash_buckets(k: jax.Array, rotations: jax.Array) -> jax.Array:
    """Angular LSH buckets ``argmax([k R_r, -k R_r])``: k [T, H], rotations [R, H, U/2] ->
    [R, T] int32 in [0, U)."""
    rotated = jnp.einsum("th,rhu->rtu", k, rotations)
    return jnp.argmax(jnp.concatenate([rotated, -rotated], axis=-1), axis=-1).astype(jnp.int32)


def random_rotations(key: jax.Array, n_heads: int, n_hashes: int, head_dim: int,
                     n_buckets: int) -> jax.Array:
    """The hash rotations ``lsh_attention`` draws from ``key``: [N, R, H, U/2] float32 normals."""
    return jax.random.normal(key, (n_heads, n_hashes, head_dim, n_buckets // 2), jnp.float32)


def _look_one_back(x: jax.Array) -> jax.Array:
    """[C, c, ...] -> [C, 2c, ...]: each chunk followed by the chunk before it (chunk 0 takes
    the last one, wrapping around as trax does)."""
    return jnp.concatenate([x, jnp.roll(x, 1, axis=0)], axis=1)


def _pair_counts(chunk_of: jax.Array, q_pos: jax.Array, k_pos: jax.Array) -> jax.Array:
    """How often each (query, key) pair of the chunked layout is attended, over all rounds.

    chunk_of [R, T]: the (global) chunk holding position t in round r. q_pos [C, c] and
    k_pos [C, 2c] are the positions of the chunked queries and keys. Query i in round r sits in
    chunk ``chunk_of[r, i]`` and sees the keys of that chunk and of the chunk before it, so
    key j is listed once for every (r, r') with ``chunk_of[r', j]`` equal to
    ``chunk_of[r, i]`` or to ``chunk_of[r, i] - 1`` (mod C). Round r' owns chunks
    [r'·T/c, (r'+1)·T/c), so only r' = r (same chunk or look-back inside the round) and
    r' = r - 1 mod R (look-back from a round's first chunk into the previous round's last)
    can match: 3R terms instead of 2R². Returns [C, c, 2c] int32, >= 1 on every listed pair.
    """
    n_rounds = chunk_of.shape[0]
    n_chunks = q_pos.shape[0]
    counts = jnp.zeros(q_pos.shape + (k_pos.shape[1],), jnp.int32)
    for r in range(n_rounds):
        q_chunk = chunk_of[r][q_pos][:, :, None]  # [C, c, 1]
        k_chunk = chunk_of[r][k_pos][:, None, :]  # [C, 1, 2c]
        counts += (k_chunk == q_chunk).astype(jnp.int32)
        counts += ((k_chunk + 1) % n_chunks == q_chunk).astype(jnp.int32)
        if n_rounds > 1:  # with one round, r - 1 is r itself, already counted
            k_prev = chunk_of[r - 1][k_pos][:, None, :]
            counts += ((k_prev + 1) % n_chunks == q_chunk).astype(jnp.int32)
    return counts


def _lsh_attention_head(qk: jax.Array, v: jax.Array, rotations: jax.Array, seg: jax.Array, *,
                        chunk: int, is_causal: bool, scale: float) -> jax.Array:
    """One (batch, head): qk, v [T, H] float32, rotations [R, H, U/2], seg [T] segment ids
    -> [T, H] float32."""
    t = qk.shape[0]
    n_rounds, n_buckets = rotations.shape[0], 2 * rotations.shape[2]
    k = qk / jnp.maximum(jnp.linalg.norm(qk, axis=-1, keepdims=True), 1e-6)
    buckets = hash_buckets(k, rotations)  # [R, T]

    # Sort every round's positions by (bucket, position); rounds stay in order, so slot
    # r·T + p of the sorted order belongs to round r. Keys fit int32 for R·U·T < 2^31.
    rounds = jnp.arange(n_rounds, dtype=jnp.int32)[:, None]
    positions = jnp.arange(t, dtype=jnp.int32)[None, :]
    sort_keys = ((rounds * n_buckets + buckets) * t + positions).reshape(-1)  # [R·T]
    order = jnp.argsort(sort_keys)  # sorted slot -> round·T + position
    undo = jnp.argsort(order)  # round·T + position -> sorted slot
    n_chunks = n_rounds * t // chunk
    q_pos = (order % t).reshape(n_chunks, chunk)  # [C, c]
    k_pos = _look_one_back(q_pos)  # [C, 2c]

    scores = jnp.einsum("cih,cjh->cij", qk[q_pos], k[k_pos]) * scale  # [C, c, 2c]
    if is_causal:
        scores = jnp.where(k_pos[:, None, :] > q_pos[:, :, None], CAUSAL_MASK_VALUE, scores)
    # Packed documents: a key of another segment is hidden like a future one.
    scores = jnp.where(seg[k_pos][:, None, :] != seg[q_pos][:, :, None], CAUSAL_MASK_VALUE,
                       scores)
    scores = jnp.where(k_pos[:, None, :] == q_pos[:, :, None], SELF_MASK_VALUE, scores)
    # A pair listed n times would weigh n times in the combined softmax: divide it back out.
    chunk_of = (undo // chunk).reshape(n_rounds, t)
    scores = scores - jnp.log(_pair_counts(chunk_of, q_pos, k_pos).astype(jnp.float32))

    # softmax subtracts the row max, exact for a row near -1e5; exp(scores - lse) would not be,
    # as lse there carries float32 rounding of ~1e-2 (a token alone in its chunks).
    out = jnp.einsum("cij,cjh->cih", jax.nn.softmax(scores, axis=-1), v[k_pos])
    lse = jax.nn.logsumexp(scores, axis=-1)  # [C, c]
    # Back to (round, position) order, then weigh the rounds by their share of the mass.
    out = out.reshape(n_rounds * t, -1)[undo].reshape(n_rounds, t, -1)  # [R, T, H]
    lse = lse.reshape(-1)[undo].reshape(n_rounds, t)  # [R, T]
    weights = jax.nn.softmax(lse, axis=0)
    return jnp.einsum("rt,rth->th", weights, out)


def lsh_attention(qk: jax.Array, v: jax.Array, *, n_hashes: int, n_buckets: int, chunk: int,
                  key: jax.Array, is_causal: bool = False, scale: float | None = None,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """Reformer LSH self-attention with shared query/key (see the module docstring).

    qk, v: [B, T, N, H]; key: PRNG key for the random rotations (one [H, U/2] matrix per head
    and round, shared over the batch); n_buckets even; chunk divides T; scale defaults to
    H^-0.5; segment_ids [B, T] (packed documents): a query sees only keys of its own
    segment. Returns [B, T, N, H] in qk's dtype; scores, softmax and sums in float32.
    """
    _check_args(qk, v, n_hashes, n_buckets, chunk)
    _, _, n, h = qk.shape
    rotations = random_rotations(key, n, n_hashes, h, n_buckets)
    if segment_ids is None:
        segment_ids = jnp.zeros(qk.shape[:2], jnp.int32)
    return _lsh_attention(qk, v, rotations, segment_ids, chunk=chunk, is_causal=is_causal,
                          scale=h ** -0.5 if scale is None else scale)


# Jitted apart from the rotations: the count loop and the gathers are many small ops (slow one
# by one), and the rotation sampler, compiled once per shape, is then reused across configs.
@functools.partial(jax.jit, static_argnames=("chunk", "is_causal", "scale"))
def _lsh_attention(qk: jax.Array, v: jax.Array, rotations: jax.Array, segment_ids: jax.Array,
                   *, chunk: int, is_causal: bool, scale: float) -> jax.Array:
    def head(qk_h: jax.Array, v_h: jax.Array, rot_h: jax.Array, seg: jax.Array) -> jax.Array:
        return _lsh_attention_head(qk_h, v_h, rot_h, seg, chunk=chunk, is_causal=is_causal,
                                   scale=scale)

    # vmap over heads (axis 1 of [B, T, N, H] inside a batch row), then over the batch.
    per_row = jax.vmap(head, in_axes=(1, 1, 0, None), out_axes=1)
    out = jax.vmap(per_row, in_axes=(0, 0, None, 0))(
        qk.astype(jnp.float32), v.astype(jnp.float32), rotations, segment_ids)
    return out.astype(qk.dtype)
