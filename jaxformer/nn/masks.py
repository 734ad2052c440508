"""Attention masks: boolean ``[B, 1, T, S]`` arrays, True where query t may attend to key s.

Letters: B batch, T query length, S key length.

Each builder returns one constraint; combine them with ``&`` (they broadcast: a mask that does
not depend on the batch has B == 1). ``make_mask`` assembles the usual combinations from the
attention-mask kind an objective names ("causal", "bidirectional", "prefix") plus the extras
of the batch (packing segment ids, padding, a sliding window).

Conventions:

* Index, not position: query t sits at absolute index ``offset + t`` and key s at index s, so
  causal means ``s <= offset + t``. With a decode cache, ``offset`` is the cache index; with
  ``offset == 0`` and T != S the triangle is top-left aligned (as ``jax.nn`` does it).
* Sliding window (Mistral, and Hugging Face ``transformers``' ``sliding_window_overlay``,
  ``kv_idx > q_idx - sliding_window`` and'ed with causal): query i sees keys j with
  ``i - window < j <= i``, i.e. ``window`` keys counting itself. ``window=1`` is the token alone.
  (flash-attn's ``window_size=(left, 0)`` is ``left = window - 1``.)
* Segment id 0 marks padding. Equal ids attend to each other, so a real token never sees
  padding or another packed document, and a padding query sees only padding, never an empty row.
* A row with no True (e.g. a padding query under ``padding_mask``) is legal: the kernels mask
  with a finite value (``MASK_VALUE``), which gives a uniform softmax, not NaN; its output is
  meaningless and must be dropped by the loss weights.
"""

from __future__ import annotations

import jax.numpy as jnp

# The masked-score value: finite, so a fully masked row gives a uniform softmax instead of NaN,
# and any real score lies far above it.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)

MASK_KINDS = ("causal", "bidirectional", "prefix")


def _query_index(q_len: int, offset: int | jnp.ndarray) -> jnp.ndarray:
    """Absolute index of each query: [1|B, T], broadcastable against keys [1, S]."""
    offset = jnp.asarray(offset, jnp.int32).reshape(-1, 1)  # [1|B, 1]
    return offset + jnp.arange(q_len, dtype=jnp.int32)[None, :]


def causal_mask(q_len: int, k_len: int | None = None, *,
                offset: int | jnp.ndarray = 0) -> jnp.ndarray:
    """Key s is visible to query t iff ``s <= offset + t``.

    offset: int, or [B] int (a per-row decode-cache index) -> [1|B, 1, T, S] bool.
    """
    k_len = q_len if k_len is None else k_len
    q_idx = _query_index(q_len, offset)  # [1|B, T]
    k_idx = jnp.arange(k_len, dtype=jnp.int32)
    return (k_idx[None, None, :] <= q_idx[:, :, None])[:, None]


def bidirectional_mask(q_len: int, k_len: int | None = None) -> jnp.ndarray:
    """Every key visible to every query -> [1, 1, T, S] bool."""
    k_len = q_len if k_len is None else k_len
    return jnp.ones((1, 1, q_len, k_len), bool)


def prefix_lm_mask(prefix_len: jnp.ndarray, seq_len: int) -> jnp.ndarray:
    """Prefix LM (T5 / UL2): bidirectional inside the first ``prefix_len[b]`` tokens, causal after.

    Key s is visible to query t iff ``s <= t or s < prefix_len``: the block matrix
    [[1, 0], [1, causal]]. prefix_len: [B] int -> [B, 1, T, T] bool.
    """
    idx = jnp.arange(seq_len, dtype=jnp.int32)
    causal = idx[None, :] <= idx[:, None]  # [T, S]
    in_prefix = idx[None, :] < jnp.asarray(prefix_len, jnp.int32)[:, None]  # [B, S]
    return (causal[None] | in_prefix[:, None, :])[:, None]


def padding_mask(q_valid: jnp.ndarray, k_valid: jnp.ndarray | None = None) -> jnp.ndarray:
    """Real queries attend only to real keys.

    q_valid: [B, T], k_valid: [B, S] (defaults to q_valid), nonzero/True for real tokens
    -> [B, 1, T, S] bool. Padding queries get an empty row (see the module docstring).
    """
    k_valid = q_valid if k_valid is None else k_valid
    q_real, k_real = jnp.asarray(q_valid).astype(bool), jnp.asarray(k_valid).astype(bool)
    return (q_real[:, :, None] & k_real[:, None, :])[:, None]


def segment_mask(q_segment_ids: jnp.ndarray,
                 k_segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
    """Packing: a query sees only keys of its own segment (0 = padding).

    q_segment_ids: [B, T] int, k_segment_ids: [B, S] int (defaults to q's) -> [B, 1, T, S] bool.
    """
    k_segment_ids = q_segment_ids if k_segment_ids is None else k_segment_ids
    return (q_segment_ids[:, :, None] == k_segment_ids[:, None, :])[:, None]


def sliding_window_mask(q_len: int, k_len: int | None = None, *, window: int,
                        offset: int | jnp.ndarray = 0) -> jnp.ndarray:
    """Causal sliding window, Mistral convention: ``i - window < j <= i`` with
    ``i = offset + t`` (``window`` keys, the query's own included).

    offset: int or [B] int -> [1|B, 1, T, S] bool.
    """
    if window < 1:
        raise ValueError(f"sliding window must be >= 1 (it counts the token itself), got {window}")
    k_len = q_len if k_len is None else k_len
    q_idx = _query_index(q_len, offset)[:, :, None]  # [1|B, T, 1]
    k_idx = jnp.arange(k_len, dtype=jnp.int32)[None, None, :]
    return ((k_idx <= q_idx) & (k_idx > q_idx - window))[:, None]


def make_mask(kind: str, *, seq_len: int | None = None, segment_ids: jnp.ndarray | None = None,
              q_valid: jnp.ndarray | None = None, k_valid: jnp.ndarray | None = None,
              prefix_len: jnp.ndarray | None = None, window: int | None = None) -> jnp.ndarray:
    """The self-attention mask of a training batch: ``kind`` and'ed with every extra given.

    kind: "causal", "bidirectional" or "prefix" (needs ``prefix_len`` [B]).
    segment_ids: [B, T] int (packing, 0 = padding); q_valid / k_valid: [B, T] / [B, S]
    (1 = real token; k_valid defaults to q_valid); window: sliding window (causal only).
    seq_len is needed only when no array gives T. -> [B|1, 1, T, S] bool (S == T unless
    k_valid says otherwise).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown attention mask kind {kind!r}; choose one of {MASK_KINDS}")
    if (kind == "prefix") != (prefix_len is not None):
        raise ValueError("prefix_len is required by, and only by, kind='prefix'")
    if window is not None and kind != "causal":
        raise ValueError(f"a sliding window is causal; it cannot combine with kind={kind!r}")
    q_len = next((x.shape[1] for x in (segment_ids, q_valid) if x is not None), seq_len)
    if q_len is None:
        raise ValueError("make_mask needs seq_len when neither segment_ids nor q_valid is given")
    k_len = q_len if k_valid is None else k_valid.shape[1]

    if kind == "prefix":
        mask = prefix_lm_mask(prefix_len, q_len)
    elif window is not None:
        mask = sliding_window_mask(q_len, k_len, window=window)
    elif kind == "causal":
        mask = causal_mask(q_len, k_len)
    else:
        mask = bidirectional_mask(q_len, k_len)
    if segment_ids is not None:
        mask = mask & segment_mask(segment_ids)
    if q_valid is not None or k_valid is not None:
        if q_valid is None:  # keys only: every query row stays a real row
            q_valid = jnp.ones((k_valid.shape[0], q_len), bool)
        mask = mask & padding_mask(q_valid, k_valid)
    return mask


def mask_to_bias(mask: jnp.ndarray, dtype: jnp.dtype = jnp.float32) -> jnp.ndarray:
    """Additive form of a boolean mask: 0 where visible, ``finfo(dtype).min`` where hidden.

    For kernels that take only a bias. Add it to scores, not to another such bias (two minima
    overflow to -inf): combine masks with ``&`` first. [..., T, S] bool -> same shape, dtype.
    """
    return jnp.where(mask, jnp.zeros((), dtype), jnp.asarray(jnp.finfo(dtype).min, dtype))
