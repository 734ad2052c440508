"""Block-sparse attention: Longformer's window + global pattern and BigBird's added random blocks.

Papers:
  * Iz Beltagy, Matthew E. Peters, Arman Cohan (2020), "Longformer: The Long-Document
    Transformer" -- a sliding window around each token plus a few global tokens that see, and
    are seen by, every position.
  * Manzil Zaheer, Guru Guruganesh, Avinava Dubey, Joshua Ainslie, Chris Alberti, Santiago
    Ontanon, Philip Pham, Anirudh Ravula, Qifan Wang, Li Yang, Amr Ahmed (2020), "Big Bird:
    Transformers for Longer Sequences" -- the same window + global pattern, blockified, plus r
    random key blocks per query block.

Both patterns are implemented at block granularity (BigBird's "blockified" form; Longformer's
token window is rounded out to whole blocks). Letters: B batch, T query length, S key length
(T == S), N query heads, K key/value heads (K divides N, G = N // K), H head dim, nb = T / block
blocks, R the most key blocks any non-global query block keeps.

Formula. With L = ``block_sparse_layout(...)`` [nb, nb] bool and b(t) = t // block, query t sees

    V(t) = {s : L[b(t), b(s)]}  AND  {s <= t if is_causal}  AND  {seg[s] == seg[t] if segment_ids}

and the output is

    out[t, n] = sum_{s in V(t)} softmax_s(scale * q[t, n] . k[s, n // G]) v[s, n // G]

with scale = H**-0.5 unless given; scores, softmax and sums in float32, output in q's dtype.

Cost. Each non-global query block gathers its R kept key blocks (rows with fewer are padded
with a masked dummy block), so its scores are [B, N, nb, block, R*block]: O(T * R * block),
never [T, S]. The first ``n_global`` query blocks see every key, so their rows are computed
densely; they are [B, N, n_global*block, S], small when n_global is.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.nn.attention_kernels import reference_attention
from jaxformer.nn.masks import MASK_VALUE


def _check_layout_args(nb: int, window: int, n_global: int, n_random: int) -> None:
    if window < 0:
        raise ValueError(f"window must be >= 0 (blocks on each side); got {window}")
    if not 0 <= n_global <= nb:
        raise ValueError(f"n_global must be in [0, nb={nb}] (global blocks); got {n_global}")
    if n_random < 0:
        raise ValueError(f"n_random must be >= 0 (random blocks per row); got {n_random}")


def block_sparse_layout(nb: int, *, window: int, n_global: int, n_random: int = 0,
                        seed: int = 0, is_causal: bool = False) -> np.ndarray:
    """Which key blocks each query block sees -> [nb, nb] bool (row = query block).

    Kept: |i - j| <= window (the diagonal always); row i < n_global (global queries see all);
    column j < n_global (every block sees the global ones); then each non-global row gets up to
    ``n_random`` more blocks drawn without replacement from those it does not yet keep (causal:
    only blocks before it), with ``np.random.default_rng(seed)``, rows in order. Causal: the
    lower triangle only.
    """
    if nb < 1:
        raise ValueError(f"nb must be >= 1 (number of blocks); got {nb}")
    _check_layout_args(nb, window, n_global, n_random)
    i, j = np.meshgrid(np.arange(nb), np.arange(nb), indexing="ij")
    layout = np.abs(i - j) <= window
    layout[:n_global, :] = True
    layout[:, :n_global] = True
    allowed = j <= i if is_causal else np.ones((nb, nb), bool)
    layout &= allowed
    rng = np.random.default_rng(seed)
    for row in range(n_global, nb):
        free = np.flatnonzero(~layout[row] & allowed[row])
        if n_random and free.size:
            picked = rng.choice(free, size=min(n_random, free.size), replace=False)
            layout[row, picked] = True
    return layout


def _row_block_lists(layout: np.ndarray, n_global: int) -> tuple[np.ndarray, np.ndarray]:
    """The kept key blocks of each non-global query block, padded to one length R.

    layout: [nb, nb] -> (idx [nb - n_global, R] int, valid [nb - n_global, R] bool). Padding
    points at block 0 with valid False, so it is gathered but masked out.
    """
    rows = [np.flatnonzero(r) for r in layout[n_global:]]
    width = max(len(r) for r in rows)
    idx = np.zeros((len(rows), width), np.int32)
    valid = np.zeros((len(rows), width), bool)
    for n, r in enumerate(rows):
        idx[n, : len(r)] = r
        valid[n, : len(r)] = True
    return idx, valid


def _sparse_rows(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, idx: np.ndarray,
                 valid: np.ndarray, block: int, first: int, is_causal: bool, scale: float,
                 segment_ids: jnp.ndarray | None) -> jnp.ndarray:
    """Attention of the query blocks ``first..nb-1`` over their gathered key blocks.

    q: [B, T, N, H], k, v: [B, S, K, H], idx/valid: [Q, R] (Q = nb - first) -> [B, Q*block, N, H].
    Scores are [B, K, G, Q, block, R*block]: the hidden blocks are never formed.
    """
    b, t, n, h = q.shape
    kv = k.shape[2]
    nq, r = idx.shape
    # Token positions of the queries [Q, block] and of the gathered keys [Q, R*block]: static,
    # so the token-level masks below cost O(T * R * block) like the scores.
    q_pos = (first + np.arange(nq))[:, None] * block + np.arange(block)
    k_pos = (idx[:, :, None] * block + np.arange(block)).reshape(nq, r * block)
    visible = np.repeat(valid, block, axis=1)[:, None, :]  # [Q, 1, R*block]
    if is_causal:
        visible = visible & (k_pos[:, None, :] <= q_pos[:, :, None])
    visible = jnp.asarray(np.broadcast_to(visible, (nq, block, r * block)))[None]
    if segment_ids is not None:
        seg_q = segment_ids[:, q_pos]  # [B, Q, block]
        seg_k = segment_ids[:, k_pos]  # [B, Q, R*block]
        visible = visible & (seg_q[:, :, :, None] == seg_k[:, :, None, :])
    kg = k.reshape(b, t // block, block, kv, h)[:, idx].reshape(b, nq, r * block, kv, h)
    vg = v.reshape(b, t // block, block, kv, h)[:, idx].reshape(b, nq, r * block, kv, h)
    qb = q[:, first * block:].reshape(b, nq, block, kv, n // kv, h)
    scores = jnp.einsum("BQTKGH,BQSKH->BKGQTS", qb, kg, preferred_element_type=jnp.float32)
    # A finite fill (not -inf) keeps a row with every key hidden uniform instead of NaN.
    scores = jnp.where(visible[:, None, None], scores * scale, MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGQTS,BQSKH->BQTKGH", weights, vg, preferred_element_type=jnp.float32)
    return out.reshape(b, nq * block, n, h)


def _global_rows(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, rows: int,
                 is_causal: bool, scale: float,
                 segment_ids: jnp.ndarray | None) -> jnp.ndarray:
    """The first ``rows`` queries against every key, densely -> [B, rows, N, H]."""
    mask = None
    if segment_ids is not None:
        mask = (segment_ids[:, :rows, None] == segment_ids[:, None, :])[:, None]  # [B,1,rows,S]
    # Top-left aligned causal (key s <= query t) is exact here: these queries start at 0.
    return reference_attention(q[:, :rows], k, v, mask=mask, is_causal=is_causal, scale=scale)


def block_sparse_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, block: int,
                           window: int, n_global: int, n_random: int = 0, seed: int = 0,
                           is_causal: bool = False, scale: float | None = None,
                           segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Block-sparse self-attention (see the module docstring for the formula).

    q: [B, T, N, H], k, v: [B, S, K, H] with T == S and T % block == 0; segment_ids: [B, T]
    int (equal ids attend) -> [B, T, N, H] in q's dtype. window, n_global, n_random and seed
    choose the layout as in ``block_sparse_layout``.
    """
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h or n % k.shape[2]:
        raise ValueError(f"q must be [B,T,N,H] and k, v [B,S,K,H] with K dividing N; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[1] != t:
        raise ValueError(f"block-sparse attention is self-attention: S must equal T={t}; "
                         f"got S={k.shape[1]}")
    if block < 1 or t % block:
        raise ValueError(f"block must be a positive divisor of T={t}; got {block}")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise ValueError(f"segment_ids must be [B, T]=({b}, {t}); got {segment_ids.shape}")
    nb = t // block
    _check_layout_args(nb, window, n_global, n_random)
    scale = h**-0.5 if scale is None else scale
    layout = block_sparse_layout(nb, window=window, n_global=n_global, n_random=n_random,
                                 seed=seed, is_causal=is_causal)
    parts = []
    if n_global:
        parts.append(_global_rows(q, k, v, rows=n_global * block, is_causal=is_causal,
                                  scale=scale, segment_ids=segment_ids))
    if n_global < nb:
        idx, valid = _row_block_lists(layout, n_global)
        parts.append(_sparse_rows(q, k, v, idx=idx, valid=valid, block=block, first=n_global,
                                  is_causal=is_causal, scale=scale, segment_ids=segment_ids))
    out = parts[0] if len(parts) == 1 else jnp.concatenate(
        [p.astype(jnp.float32) for p in parts], axis=1)
    return out.astype(q.dtype)


def longformer_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, block: int,
                         window: int, n_global: int, is_causal: bool = False,
                         scale: float | None = None,
                         segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Longformer (Beltagy et al. 2020), blockified: window + global blocks, no random ones.

    Shapes as ``block_sparse_attention`` -> [B, T, N, H].
    """
    return block_sparse_attention(q, k, v, block=block, window=window, n_global=n_global,
                                  n_random=0, is_causal=is_causal, scale=scale,
                                  segment_ids=segment_ids)


def bigbird_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, block: int,
                      window: int, n_global: int, n_random: int, seed: int = 0,
                      is_causal: bool = False, scale: float | None = None,
                      segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """BigBird (Zaheer et al. 2020): window + global + ``n_random`` random blocks per row.

    Shapes as ``block_sparse_attention`` -> [B, T, N, H].
    """
    return block_sparse_attention(q, k, v, block=block, window=window, n_global=n_global,
                                  n_random=n_random, seed=seed, is_causal=is_causal,
                                  scale=scale, segment_ids=segment_ids)
