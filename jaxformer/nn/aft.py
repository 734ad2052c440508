"""Attention Free Transformer: AFT-full, AFT-local and AFT-simple.

Shuangfei Zhai, Walter Talbott, Nitish Srivastava, Chen Huang, Hanlin Goh, Ruixiang Zhang and
Josh Susskind (2021), "An Attention Free Transformer", arXiv:2105.14103.

Letters: B batch, T length, D model width (AFT's single-head form: every channel of D mixes over
time on its own; there are no heads).

Formula (paper eq. 2), elementwise over the D channels:

    Y_t = sigmoid(Q_t) * [sum_t' exp(K_t' + w_{t,t'}) * V_t'] / [sum_t' exp(K_t' + w_{t,t'})]

with the sums over every t' (non-causal) or t' <= t (``is_causal``), and

- AFT-full (``aft_full``): w [T, T] is a learned pairwise position bias;
- AFT-local (``aft_local``): w_{t,t'} as learned for |t - t'| < window and 0 outside; the
  outside terms stay in the sums, with w = 0 (paper eq. 3);
- AFT-simple (``aft_simple``): w = 0, so Y_t = sigmoid(Q_t) * sum_t' softmax_t'(K)_t' * V_t'
  (paper eq. 4), no [T, T] matrix: O(T D) memory.

Full runs as in the paper, as one matmul: exp(w - rowmax(w)) [T, T] @
[exp(K - max_t K) * V, exp(K - max_t K)] [B, T, 2D], numerator over denominator. The two shifts
cancel in the ratio; they keep every exp <= 1, so large K or w cannot overflow. Limit of this
factorised form (float32): a row t underflows to 0/0 only when no visible t' has
(w_{t,t'} - rowmax_t w) + (K_t' - max K) > ~-87. Without ``is_causal`` the argmax of K and the
rowmax of w are both visible, so that needs both spreads (of w in a row, of K over time in one
channel) above ~87; causal rows may not see the argmax of K, so there a spread of K alone above
~87 between early and later positions, uncompensated by w, can do it.

Local runs in the paper's O(T window D) form, no [T, T] array (see ``aft_local``): the keys
within the window's blocks by the same factorised matmul per block of queries, the keys
further away (all with w = 0) as carried partial sums from a segmented log-sum-exp scan over
blocks. Its shifts are local (the max of K over a query's neighbour blocks), so the limit above
applies within a few blocks only, and causal rows do not depend on later tokens, bit for bit.

Non-causal AFT-simple is a softmax over time, O(T D). Causal (or packed) AFT-simple keeps
running (max, numerator, denominator) triples, merged as a streaming log-sum-exp, by a
doubling scan: ceil(log2 T) elementwise steps, O(T D log T) work, exact and finite for any K.

Packing (``segment_ids`` [B, T] int): implemented exactly, not refused. A token sees only the
tokens of its own run of equal consecutive segment ids (packed documents are contiguous runs;
this is the usual equal-ids mask whenever each id occupies a single run, padding 0 included).
Full hides the other runs in the [B, T, T] weight matrix, local in its per-block [B, T, n]
weights and its carried sums (which follow the runs); simple uses a segmented scan (no [T, T]
matrix).

All arithmetic is float32; outputs come back in q's dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.params import constant_param, normal_param

VARIANTS = ("full", "local", "simple")

# Keyword arguments of the attention module that AFT cannot honour: refused rather than ignored.
_REFUSED = ("context", "context_kv", "cache", "mask", "bias", "window")


def _check_qkv(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
               segment_ids: jnp.ndarray | None) -> None:
    if q.ndim != 3 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must share one shape [B, T, D]; got {q.shape}, {k.shape}, "
                         f"{v.shape}")
    if segment_ids is not None and segment_ids.shape != q.shape[:2]:
        raise ValueError(f"segment_ids must be [B, T] = {q.shape[:2]}; got {segment_ids.shape}")


def run_starts(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """segment_ids [B, T] -> [B, T] bool, True where a run of equal ids starts (t = 0 too)."""
    change = segment_ids[:, 1:] != segment_ids[:, :-1]
    return jnp.concatenate([jnp.ones_like(change[:, :1]), change], axis=1)


def visible_pairs(length: int, is_causal: bool,
                  segment_ids: jnp.ndarray | None) -> jnp.ndarray | None:
    """Which (t, t') enter row t's sums -> [1|B, T, T] bool, or None when every pair does.
    The diagonal is always visible, so no row is empty."""
    mask = None
    if is_causal:
        mask = jnp.tril(jnp.ones((length, length), bool))[None]
    if segment_ids is not None:
        runs = jnp.cumsum(run_starts(segment_ids), axis=1)  # [B, T] run number
        same = runs[:, :, None] == runs[:, None, :]
        mask = same if mask is None else mask & same
    return mask


def aft_full(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, w: jnp.ndarray, *,
             is_causal: bool = False, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """AFT-full. q, k, v: [B, T, D]; w: [T, T] pairwise position biases (row t: query, column
    t': key; the top-left slice of the learned table); segment_ids: [B, T] int or None.
    -> [B, T, D] in q's dtype.
    """
    _check_qkv(q, k, v, segment_ids)
    t = q.shape[1]
    if w.shape != (t, t):
        raise ValueError(f"w must be [T, T] = ({t}, {t}); got {w.shape}")
    w = w.astype(jnp.float32)[None]  # [1, T, T]
    visible = visible_pairs(t, is_causal, segment_ids)
    if visible is None:
        row_max = jnp.max(w, axis=-1, keepdims=True)
        a = jnp.exp(w - jax.lax.stop_gradient(row_max))
    else:
        # The inner where keeps hidden entries finite, so their exp and gradient stay clean.
        row_max = jnp.max(jnp.where(visible, w, -jnp.inf), axis=-1, keepdims=True)
        shifted = jnp.where(visible, w - jax.lax.stop_gradient(row_max), 0.0)
        a = jnp.where(visible, jnp.exp(shifted), 0.0)  # [1|B, T, T]
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    # Shift per (batch, channel): the ratio does not depend on it, hence stop_gradient.
    ek = jnp.exp(kf - jax.lax.stop_gradient(jnp.max(kf, axis=1, keepdims=True)))  # [B, T, D]
    stacked = jnp.concatenate([ek * vf, ek], axis=-1)  # [B, T, 2D]: one matmul for both sums
    if a.shape[0] == 1:
        sums = jnp.einsum("ts,bsd->btd", a[0], stacked)
    else:
        sums = jnp.einsum("bts,bsd->btd", a, stacked)
    num, den = jnp.split(sums, 2, axis=-1)
    return (jax.nn.sigmoid(q.astype(jnp.float32)) * num / den).astype(q.dtype)


def local_bias(w: jnp.ndarray, window: int) -> jnp.ndarray:
    """w [T, T] with entries at |t - t'| >= window set to 0 -> [T, T] (AFT-local's bias as a
    dense matrix: a reference, ``aft_local`` itself reads only the band)."""
    _check_window(window)
    t = jnp.arange(w.shape[0])
    near = jnp.abs(t[:, None] - jnp.arange(w.shape[1])[None, :]) < window
    return jnp.where(near, w, jnp.zeros_like(w))


def _check_window(window: int) -> None:
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1; got {window!r}")


# AFT-local's block: at least the window, and at least this many tokens, so that a short window
# does not make the block-level scan long.
_MIN_BLOCK = 16
_LN2 = math.log(2.0)


def _pow2(n: jnp.ndarray) -> jnp.ndarray:
    """int32 n <= 127 -> 2.0 ** n in float32, built from its bits (exact), 0 below 2 ** -126."""
    bits = (jnp.clip(n, -127, 127) + 127) << 23
    return jax.lax.bitcast_convert_type(bits.astype(jnp.int32), jnp.float32)


def _neighbour_blocks(x: jnp.ndarray, offsets: tuple[int, ...], fill) -> jnp.ndarray:
    """x [B, nb, c, ...] -> [B, nb, len(offsets) * c, ...]: for block j, blocks j + o side by
    side (o in ``offsets``), ``fill`` where j + o is outside [0, nb)."""
    nb = x.shape[1]
    pad = [(0, 0), (1, 1)] + [(0, 0)] * (x.ndim - 2)
    x = jnp.pad(x, pad, constant_values=fill)
    return jnp.concatenate([x[:, 1 + o:1 + o + nb] for o in offsets], axis=2)


def _shift_blocks(x: jnp.ndarray, o: int, fill) -> jnp.ndarray:
    """x [B, nb, ...] -> y with y[:, j] = x[:, j + o], ``fill`` where j + o is outside [0, nb)."""
    nb = x.shape[1]
    pad = [(0, 0), (max(-o, 0), max(o, 0))] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, pad, constant_values=fill)[:, max(o, 0):max(o, 0) + nb]


def _block_carries(kb: jnp.ndarray, vb: jnp.ndarray, rb: jnp.ndarray,
                   is_causal: bool) -> list[tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]]:
    """The keys at least two blocks away, as carried partial sums: for query block j, the keys
    of blocks <= j - 2 in the run of block j - 2's last token, up to that token (and without
    ``is_causal`` also the keys of blocks >= j + 2 in the run of block j + 2's first token).
    kb, vb: [B, nb, c, D]; rb: [B, nb, c] run numbers (-1 never a run).
    -> per direction (run [B, nb], max m [B, nb, D] of K over those keys, [num, den]
    [B, nb, 2, D] shifted by m), run -1 where there is no such block.

    Each block is summarised alone ([B, nb, c, D] masked sums), then merged by the segmented
    log-sum-exp scan of AFT-simple (``_lse_scan``) over the nb blocks; the later keys are the
    same scan on the time-reversed blocks, stacked on the batch axis (one scan for both)."""
    b = kb.shape[0]
    views = (kb, vb, rb)
    if not is_causal:  # time-reversed copy: blocks and tokens in blocks flipped
        views = tuple(jnp.concatenate([x, jnp.flip(x, axis=(1, 2))]) for x in views)
    kb, vb, rb = views
    edge = rb[:, :, -1]  # the run of each block's last token
    member = (rb == edge[:, :, None])[..., None]  # [., nb, c, 1]
    m = jax.lax.stop_gradient(jnp.max(jnp.where(member, kb, -jnp.inf), axis=2))  # [., nb, D]
    e = jnp.where(member, jnp.exp(jnp.where(member, kb - m[:, :, None], 0.0)), 0.0)
    nd = jnp.stack([jnp.sum(e * vb, axis=2), jnp.sum(e, axis=2)], axis=2)  # [., nb, 2, D]
    # A block starts a new partial sum when its run does not reach into the block before.
    starts = edge != _shift_blocks(edge, -1, -1)
    _, m, nd = _lse_scan((starts[:, :, None, None], m[:, :, None], nd))
    # Block j takes the partial sum of block j - 2.
    out = (_shift_blocks(edge, -2, -1), _shift_blocks(m[:, :, 0], -2, 0.0),
           _shift_blocks(nd, -2, 0.0))
    if is_causal:
        return [out]
    return [tuple(x[:b] for x in out), tuple(jnp.flip(x[b:], axis=1) for x in out)]


def aft_local(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, w: jnp.ndarray, *, window: int,
              is_causal: bool = False, segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """AFT-local: ``aft_full`` with w zeroed where |t - t'| >= window (those keys still count,
    with bias 0), in O(T * window * D) time and memory, no [T, T] array.
    q, k, v: [B, T, D]; w: [T, T], or any larger table (its top-left [T, T] is meant; only the
    entries with |t - t'| < window are read); window: int >= 1 (1 keeps only the diagonal of w);
    segment_ids: [B, T] int or None. -> [B, T, D] in q's dtype.

    The paper's split (its AFT-local paragraph), sum over all keys + sum over the window of
    (exp(w) - 1) exp(K) V, is computed in the equivalent form without the subtraction: sum over
    the keys outside the window of exp(K) V + sum over the window of exp(w + K) V. The sequence
    is cut into blocks of c = max(window, 16) tokens (padded at the end; one block when that
    covers T). Query block j takes its neighbour blocks directly, as one matmul per block:
    A [c, n] @ [exp(K - mu) V, exp(K - mu)] [n, 2D] (mu: below), with the keys of blocks
    j - 1, j (n = 2c, causal) or j - 1, j, j + 1 (n = 3c), A = exp(w - r) inside the window and
    exp(0 - r) outside, 0 for hidden pairs. Every key further away is outside the window and
    enters through one carried partial sum: the keys in blocks <= j - 2 of the query's run,
    from a segmented log-sum-exp scan over the nb blocks (and, non-causal, the keys in blocks
    >= j + 2, from the same scan over the reversed blocks).

    Shifts, as in ``aft_full`` but local: r per query (the max of its visible biases, 0
    included when it sees keys outside the window); for K a power of two, exp(K) =
    exp(K - e ln 2) 2^e with e = floor(K / ln 2) per key, the neighbour keys scaled by 2^(e - E),
    E their max e per query block and channel; each carried sum keeps its own max of K; all are
    brought to the larger of E and the carried exponents per query and channel, and the final
    division is done at den's own power of two. They cancel in the ratio and keep every term
    <= 2 (no overflow for any K or w). As the shifts of K are powers of two, applied by exact
    multiplications, a causal row's output does not depend on later tokens bit for bit (E takes
    in the later tokens of its block). Limit (float32): a row underflows to 0/0 only when all
    its visible terms are below ~2^-126 against those shifts, i.e. a spread of K above ~87
    between the keys a row sees and a key of its neighbour blocks that it does not see (a later
    token of its own block when causal, or another document's), uncompensated by w; ``aft_full``
    has the same limit with the max over the whole sequence.
    Memory: O(B T (c + D)) (A is [B|1, T, n], no [T, n, D] array), time O(B T c D).
    """
    _check_qkv(q, k, v, segment_ids)
    _check_window(window)
    b, t, d = q.shape
    if w.ndim != 2 or w.shape[0] < t or w.shape[1] < t:
        raise ValueError(f"w must be [T, T] = ({t}, {t}) or a larger table; got {w.shape}")
    s = min(window, t)
    c = max(s, _MIN_BLOCK)
    c = t if c >= t else c
    nb = -(-t // c)
    tp = nb * c
    if segment_ids is None:  # one run (1); batch 1, so that A is shared by the batch
        runs = jnp.ones((1, t), jnp.int32)
    else:
        runs = jnp.cumsum(run_starts(segment_ids), axis=1, dtype=jnp.int32)  # runs from 1
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    if tp > t:  # padding: run 0, a run of its own that no real token sees
        kf, vf = (jnp.pad(x, ((0, 0), (0, tp - t), (0, 0))) for x in (kf, vf))
        runs = jnp.pad(runs, ((0, 0), (0, tp - t)))
    kb, vb = kf.reshape(b, nb, c, d), vf.reshape(b, nb, c, d)
    rb = runs.reshape(runs.shape[0], nb, c)  # [B|1, nb, c]

    # The neighbour blocks of each query block: keys [B, nb, n, D], n = len(offsets) * c.
    offsets = tuple(o for o in ((-1, 0) if is_causal else (-1, 0, 1)) if abs(o) < nb)
    kc, vc = _neighbour_blocks(kb, offsets, 0.0), _neighbour_blocks(vb, offsets, 0.0)
    rc = _neighbour_blocks(rb, offsets, -1)  # -1: outside the sequence, in no run
    # Positions from iota (jnp, not numpy: no [nb, c, n] constants in the program).
    qpos = jnp.arange(tp).reshape(nb, c)
    kpos = jnp.concatenate([qpos + o * c for o in offsets], axis=1)  # [nb, n]
    rel = kpos[:, None, :] - qpos[:, :, None]  # t' - t, [nb, c, n]
    near = (jnp.abs(rel) < s) & (kpos[:, None, :] >= 0) & (kpos[:, None, :] < t) & (
        qpos[:, :, None] < t)
    # The band of w, gathered: [nb, c, n], 0 outside the window (indices there point at w[0, 0]).
    rows = jnp.where(near, qpos[:, :, None], 0)
    cols = jnp.where(near, kpos[:, None, :], 0)
    wb = jnp.where(near, w[rows, cols].astype(jnp.float32), 0.0)
    visible = rc[:, :, None, :] == rb[:, :, :, None]  # [B|1, nb, c, n]: same run (in range)
    if is_causal:
        visible = visible & (rel <= 0)
    r = jnp.max(jnp.where(visible, wb, -jnp.inf), axis=-1)  # [B|1, nb, c]
    # K's shift, in powers of two: exp(K) = exp(K - e ln 2) 2^e with e = floor(K / ln 2) per
    # key, and the neighbour blocks' keys scaled by the exact 2^(e - E), E = their max e.
    real = (rc > 0)[..., None]  # [B|1, nb, n, 1]: real tokens (not padding, in range)
    e = jax.lax.stop_gradient(jnp.where(real, jnp.floor(kc / _LN2), -2 ** 20).astype(jnp.int32))
    big_e = jnp.max(e, axis=2, keepdims=True)  # [B, nb, 1, D]
    top = big_e  # the row's exponent: max of E and the carried sums' (ceil of max / ln 2)

    # Keys of the query's run in blocks <= j - 2 (and >= j + 2): one carried sum each.
    carries = []
    if nb >= 3:
        for run, m, nd in _block_carries(kb, vb, jnp.broadcast_to(rb, (b, nb, c)), is_causal):
            # [B|1, nb, c]: the carry is of the query's run (one run for all rows: batch 1)
            uses = run[:rb.shape[0], :, None] == rb
            r = jnp.where(uses, jnp.maximum(r, 0.0), r)  # its keys are outside the window
            uses = uses[..., None]
            f = jnp.ceil(m / _LN2).astype(jnp.int32)[:, :, None]  # [B, nb, 1, D]
            carries.append((uses, m[:, :, None], f, nd[:, :, None]))
            top = jnp.maximum(top, jnp.where(uses, f, -2 ** 20))
    r = jax.lax.stop_gradient(r)  # it cancels in the ratio

    a = jnp.where(visible, jnp.exp(jnp.where(visible, wb - r[..., None], 0.0)), 0.0)
    mant = jnp.where(real, jnp.exp(jnp.where(real, kc - e * _LN2, 0.0)), 0.0)  # [1, 2)
    ek = mant * _pow2(e - big_e)  # [B, nb, n, D], exact scaling
    stacked = jnp.concatenate([ek * vc, ek], axis=-1)  # [B, nb, n, 2D]
    if a.shape[0] == 1:
        sums = jnp.einsum("jtn,bjnd->bjtd", a[0], stacked)
    else:
        sums = jnp.einsum("bjtn,bjnd->bjtd", a, stacked)
    num, den = jnp.split(sums * jnp.tile(_pow2(big_e - top), 2), 2, axis=-1)  # [B, nb, c, D]
    for uses, m, f, nd in carries:
        # exp(m - r - top ln 2) as exp(m - f ln 2 - r) (this row's own numbers) times 2^(f - top)
        scale = jnp.exp(jnp.where(uses, m - f * _LN2 - r[..., None], 0.0)) * _pow2(f - top)
        scale = jnp.where(uses, scale, 0.0)
        num = num + scale * nd[:, :, :, 0]
        den = den + scale * nd[:, :, :, 1]
    if tp > t:  # the padded rows see no real key: 0 / 0, kept out of the gradient too
        den = jnp.where((qpos < t)[:, :, None], den, 1.0)
    # Divide at a scale near 1: both times 2^-exponent(den), exact, so that a small den (a
    # row far below its block's shift) does not overflow den^2 in the gradient.
    unit = _pow2(-jnp.frexp(jax.lax.stop_gradient(den))[1])
    mixed = ((num * unit) / (den * unit)).reshape(b, tp, d)[:, :t]
    return (jax.nn.sigmoid(q.astype(jnp.float32)) * mixed).astype(q.dtype)


def _lse_merge(a: tuple, b: tuple) -> tuple:
    """Merge two (start, max, [num, den]) partial sums, ``a`` the earlier: if ``b`` holds a
    run start it is kept alone (a segmented scan); else num and den are rescaled to the larger
    max. Associative, so any scan order gives the same sums."""
    a_start, a_m, a_nd = a
    b_start, b_m, b_nd = b
    m = jnp.maximum(a_m, b_m)
    nd = a_nd * jnp.exp(a_m - m) + b_nd * jnp.exp(b_m - m)
    return a_start | b_start, jnp.where(b_start, b_m, m), jnp.where(b_start, b_nd, nd)


@jax.jit
def _prefix_sums(k: jnp.ndarray, v: jnp.ndarray, starts: jnp.ndarray) -> jnp.ndarray:
    """sum_{t' <= t in t's run} exp(K_t') V_t' / sum_{t' <= t in t's run} exp(K_t'), as a
    streaming log-sum-exp (a running max rescales the sums, so no exp exceeds 1).
    k, v: [B, T, D] float32; starts: [B, T] bool -> [B, T, D].

    A Hillis-Steele doubling scan: step i merges each position with the partial sum 2^i
    earlier; ceil(log2 T) elementwise steps over [B, T, 3, D], O(T D log T) work, depth log T.
    One loop body (``fori_loop``, a rolled shift): unrolled steps or
    ``jax.lax.associative_scan`` took 2-4x longer to compile with their gradient on CPU."""
    # start [B, T, 1, 1], max [B, T, 1, D], (num, den) [B, T, 2, D]
    state = (starts[:, :, None, None], k[:, :, None], jnp.stack([v, jnp.ones_like(v)], axis=2))
    state = _lse_scan(state)
    return state[2][:, :, 0] / state[2][:, :, 1]


def _lse_scan(state: tuple) -> tuple:
    """The segmented scan of ``_lse_merge`` along axis 1 of (start [B, T, 1, 1], max
    [B, T, 1, D], [num, den] [B, T, 2, D]): each position gets the merge of every position up to
    it since the last start. A doubling scan, ceil(log2 T) steps (see ``_prefix_sums``)."""
    t = state[0].shape[1]
    position = jnp.arange(t)[None, :, None, None]

    def step(i: jnp.ndarray, state: tuple) -> tuple:
        offset = 2 ** i
        merged = _lse_merge(tuple(jnp.roll(x, offset, axis=1) for x in state), state)
        keep = position >= offset  # earlier positions have no partner; the roll wrapped there
        return tuple(jnp.where(keep, y, x) for x, y in zip(state, merged, strict=True))

    return jax.lax.fori_loop(0, max(1, (t - 1).bit_length()), step, state)


def aft_simple(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *, is_causal: bool = False,
               segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """AFT-simple, no [T, T] matrix (causal or packed: a log2 T step scan).
    q, k, v: [B, T, D]; segment_ids: [B, T] int or None.
    -> [B, T, D] in q's dtype."""
    _check_qkv(q, k, v, segment_ids)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    if segment_ids is None and not is_causal:
        mixed = jnp.sum(jax.nn.softmax(kf, axis=1) * vf, axis=1, keepdims=True)  # [B, 1, D]
    else:
        b, t = q.shape[:2]
        starts = (run_starts(segment_ids) if segment_ids is not None
                  else jnp.zeros((b, t), bool).at[:, 0].set(True))
        mixed = _prefix_sums(kf, vf, starts)  # [B, T, D]
        if not is_causal:
            # Every token takes its run's total: the prefix sum at the run's last position.
            pos = jnp.broadcast_to(jnp.arange(t), (b, t))
            ends = jnp.concatenate([starts[:, 1:], jnp.ones_like(starts[:, :1])], axis=1)
            last = jax.lax.cummin(jnp.where(ends, pos, t), axis=1, reverse=True)
            mixed = jnp.take_along_axis(mixed, last[:, :, None], axis=1)
    return (jax.nn.sigmoid(q.astype(jnp.float32)) * mixed).astype(q.dtype)


class AFT(nnx.Module):
    """AFT layer in place of an attention module: x -> Q, K, V (each [D, D] + bias) -> the
    variant's mixing -> output projection [D, D] (+ bias), as in the paper's reference code.

    Params: ``w_q``/``w_k``/``w_v`` [D, D] (embed, mlp), ``w_out`` [D, D] (mlp, embed); with
    ``use_bias`` also ``b_q``/``b_k``/``b_v`` [D] (mlp) and ``b_out`` [D] (embed). Variants
    'full' and 'local' add ``pos_bias`` [max_len, max_len] (unsharded), initialised to zeros,
    so a fresh layer mixes as AFT-simple; the paper also discusses factorising it as u v^T,
    not done here. 'local' reads it only for |t - t'| < window.
    """

    def __init__(self, d_model: int, *, variant: str, max_len: int, window: int = 0,
                 use_bias: bool = True, init_std: float = 0.02, out_std: float | None = None,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}; got {variant!r}")
        if variant == "local" and window < 1:
            raise ValueError(f"window must be >= 1 for variant 'local'; got {window}")
        if variant != "local" and window != 0:
            raise ValueError(f"window must be 0 unless variant is 'local'; got {window}")
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1; got {max_len}")
        self.variant = variant
        self.max_len = max_len
        self.window = window
        self.dtype = dtype
        out_std = init_std if out_std is None else out_std
        d = d_model
        self.w_q = normal_param(rngs, (d, d), ("embed", "mlp"), init_std, param_dtype)
        self.w_k = normal_param(rngs, (d, d), ("embed", "mlp"), init_std, param_dtype)
        self.w_v = normal_param(rngs, (d, d), ("embed", "mlp"), init_std, param_dtype)
        self.w_out = normal_param(rngs, (d, d), ("mlp", "embed"), out_std, param_dtype)
        if use_bias:
            self.b_q = constant_param((d,), ("mlp",), 0.0, param_dtype)
            self.b_k = constant_param((d,), ("mlp",), 0.0, param_dtype)
            self.b_v = constant_param((d,), ("mlp",), 0.0, param_dtype)
            self.b_out = constant_param((d,), ("embed",), 0.0, param_dtype)
        else:
            self.b_q = self.b_k = self.b_v = self.b_out = None
        self.pos_bias = (constant_param((max_len, max_len), (None, None), 0.0, param_dtype)
                         if variant != "simple" else None)

    def _project(self, x: jnp.ndarray) -> list[jnp.ndarray]:
        """x [B, T, D] -> [Q, K, V], each [B, T, D], as one [B*T, D] x [D, 3D] matmul."""
        dt = self.dtype
        b, t, d = x.shape
        w = jnp.concatenate([p[...].astype(dt) for p in (self.w_q, self.w_k, self.w_v)], axis=1)
        y = x.astype(dt).reshape(b * t, d) @ w
        if self.b_q is not None:
            y = y + jnp.concatenate([p[...].astype(dt) for p in (self.b_q, self.b_k, self.b_v)])
        return [s.reshape(b, t, d) for s in jnp.split(y, 3, axis=1)]

    def __call__(self, x: jnp.ndarray, *, is_causal: bool = False,
                 segment_ids: jnp.ndarray | None = None, dropout_rng: jax.Array | None = None,
                 **unused) -> tuple[jnp.ndarray, None]:
        """x: [B, T, D], T <= max_len; segment_ids: [B, T] int (packing, exact, see the module
        docstring). -> (y [B, T, D] in the compute dtype, None: AFT keeps no KV cache).

        dropout_rng is accepted and unused (AFT has no attention weights to drop). Of the other
        attention keywords, positions and cache_index are ignored (the position bias is indexed
        by slot), while a non-None context, context_kv, cache, mask, bias or window raises
        (AFT-local takes its own window, which the model passes as the sliding window).
        """
        if self.variant == "local" and unused.get("window") == self.window:
            unused.pop("window")  # the model's sliding window is AFT-local's own window
        refused = [name for name in _REFUSED if unused.get(name) is not None]
        if refused:
            raise ValueError(f"AFT does not support {', '.join(refused)}; pass None (AFT does "
                             f"self-mixing only, with is_causal and segment_ids)")
        b, t, d = x.shape
        if t > self.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len={self.max_len}")
        q, k, v = self._project(x)
        if self.variant == "simple":
            out = aft_simple(q, k, v, is_causal=is_causal, segment_ids=segment_ids)
        else:
            if self.variant == "local":  # reads the band of the whole table, no [T, T] slice
                out = aft_local(q, k, v, self.pos_bias[...], window=self.window,
                                is_causal=is_causal, segment_ids=segment_ids)
            else:
                out = aft_full(q, k, v, self.pos_bias[...][:t, :t], is_causal=is_causal,
                               segment_ids=segment_ids)
        y = out.reshape(b * t, d) @ self.w_out[...].astype(self.dtype)
        if self.b_out is not None:
            y = y + self.b_out[...].astype(self.dtype)
        return y.reshape(b, t, d), None
