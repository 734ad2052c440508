"""Multi-head, grouped-query and multi-query attention; self- or cross-attention.

Letters: B batch, T query length, S key length, D model width, N query heads, K key/value heads
(K == N multi-head, 1 < K < N grouped-query, K == 1 multi-query), H head dim.

The softmax itself is a kernel from ``attention_kernels`` (reference einsum, XLA, cuDNN, Pallas
flash/splash), chosen by name; this module owns the projections, rotary embeddings, the decode
cache and attention-weight dropout.

Attention maps: with ``capture_attention`` set (off by default; see
``jaxformer.analysis.attention_maps``), a call computes the reference kernel's explicit softmax,
whatever ``implementation`` says, and sows it as ``nnx.Intermediate`` "attention_weights"
[B, N, T, S] float32 (after masking: rows sum to 1, hidden keys are 0), to be collected with
``nnx.capture``. The output is the reference kernel's, so only the kernel choice changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TypedDict

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.attention_kernels import (
    AttentionFn,
    apply_attention_weights,
    attention_weights,
    cached_attention,
    get_attention_fn,
    reference_attention,
)
from jaxformer.nn.dropout import dropout
from jaxformer.nn.linear_attention import LinearState, linear_attention_step
from jaxformer.nn.lora_branch import branch_output
from jaxformer.nn.params import constant_param, normal_param
from jaxformer.nn.positional import apply_rope


class LayerCache(TypedDict):
    """Decode cache of one attention layer: keys and values of every position written so far,
    heads first: each head's slots are contiguous, so the attention products read the cache as
    it lies (``cached_attention``); with the slots first, XLA copied the whole cache into this
    order at every decode step (docs/benchmarks.md, "Decoding")."""

    k: jnp.ndarray  # [B, K, S, H]
    v: jnp.ndarray  # [B, K, S, H]


class LinearCache(TypedDict):
    """Decode state of a linear-attention layer (``model.attention_type='linear'``): the
    running sums instead of every key and value, a fixed size whatever the length.
    ``slots`` is only there for its length: the decode mask spans the slots a generation may
    fill (B x S bools against the B x K x S x H floats a LayerCache would hold)."""

    slots: jnp.ndarray  # [B, S] bool, never written
    s: jnp.ndarray  # [B, K, H, H] float32: sum of phi(k) v^T
    z: jnp.ndarray  # [B, K, H] float32: sum of phi(k)


# The axis that holds the slots in each kind of cache array: LayerCache's k/v are heads first;
# MLA's latent and rope key ([B, S, C]) have no head axis.
_SLOT_AXIS = {"k": 2, "v": 2}


def slot_axis(name: str) -> int:
    """The slot axis of the cache array called ``name`` (LayerCache k/v: 2; MLA: 1)."""
    return _SLOT_AXIS.get(name, 1)


_NO_SLOTS = frozenset({"s", "z"})  # LinearCache's running sums: one size whatever the length


def extend_cache(layer_cache: Mapping[str, jnp.ndarray], length: int) -> dict[str, jnp.ndarray]:
    """One layer's cache (LayerCache, MLACache or LinearCache) with its slots zero-padded up to
    ``length``: the slots added are empty, as ``init_cache`` makes them."""
    def pad(name: str, a: jnp.ndarray) -> jnp.ndarray:
        if name in _NO_SLOTS:
            return a
        axis = slot_axis(name)
        widths = [(0, 0)] * a.ndim
        widths[axis] = (0, length - a.shape[axis])
        return jnp.pad(a, widths)
    return {name: pad(name, a) for name, a in layer_cache.items()}


def cache_length(layer_cache: Mapping[str, jnp.ndarray]) -> int:
    """Slots of one layer's cache (a LayerCache or an MLACache)."""
    name, array = next(iter(layer_cache.items()))
    return array.shape[slot_axis(name)]


@dataclasses.dataclass(frozen=True)
class Rope:
    """Rotary embedding settings (see ``positional.apply_rope``)."""

    theta: float = 10000.0
    fraction: float = 1.0


def decode_mask(batch: int, query_len: int, cache_len: int, cache_index: jnp.ndarray, *,
                window: int | None = None, offsets: jnp.ndarray | None = None,
                prefix_end: jnp.ndarray | int | None = None) -> jnp.ndarray:
    """Mask for decoding with a cache: query i sits at slot cache_index + i and sees every
    cached key at a slot not after it (and, with a sliding window, fewer than ``window`` slots
    before it). cache_index: a scalar (every row at one slot) or [B] (each row at its own:
    continuous batching).

    offsets: [B] int, the left-padding slots of each row (a batch of prompts of different
    lengths is right-aligned): keys at slots below a row's offset are hidden from it.
    prefix_end: slots below it form a bidirectional prefix (a prefix-LM prompt): a query there
    sees every key there. -> [B, 1, T, S] bool.
    """
    index = jnp.asarray(cache_index)
    q_idx = (index[..., None] + jnp.arange(query_len))[..., None]  # [T, 1] or [B, T, 1]
    k_idx = jnp.arange(cache_len)[None, :]  # [1, S]
    mask = k_idx <= q_idx
    if window is not None:
        mask &= k_idx > q_idx - window
    if prefix_end is not None:
        mask |= (q_idx < prefix_end) & (k_idx < prefix_end)
    mask = jnp.broadcast_to(mask.reshape(-1, 1, query_len, cache_len),
                            (batch, 1, query_len, cache_len))
    if offsets is not None:
        mask &= (k_idx >= offsets[:, None])[:, None, None, :]  # [B, 1, 1, S]
    return mask


def decode_positions(batch: int, length: int, start: jnp.ndarray,
                     offsets: jnp.ndarray | None) -> jnp.ndarray:
    """Positions of ``length`` slots from slot ``start`` (a scalar or [B]): the slot minus the
    row's left padding (``offsets`` [B] or None), 0 inside the padding. -> [B, length] int32."""
    slots = jnp.broadcast_to(jnp.asarray(start)[..., None] + jnp.arange(length), (batch, length))
    if offsets is None:
        return slots
    return jnp.maximum(slots - offsets[:, None], 0)


def write_cache(cache: jnp.ndarray, new: jnp.ndarray, index: jnp.ndarray,
                axis: int = 1) -> jnp.ndarray:
    """cache with new written at slots index .. index + T - 1 along ``axis`` (cache [B, S, ...]
    and new [B, T, ...] for axis 1; [B, K, S, H] and [B, K, T, H] for axis 2): one slice when
    ``index`` is a scalar, a scatter per row when it is [B]."""
    new = new.astype(cache.dtype)

    def start(i):
        return tuple(i if d == axis else 0 for d in range(cache.ndim))

    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, start(index))
    return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice(c, n, start(i)[1:]))(
        cache, new, index)


def attend_and_sow(module: nnx.Module, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                    kwargs: dict, rate: float, dropout_rng: jax.Array | None) -> jnp.ndarray:
    """The reference kernel in its two halves, sowing the probabilities [B, N, T, S] (before
    any dropout) on ``module`` as ``nnx.Intermediate`` "attention_weights" -> [B, T, N, H]."""
    weights = attention_weights(q, k, **kwargs)
    module.sow(nnx.Intermediate, "attention_weights", weights)
    if dropout_rng is not None and rate > 0.0:
        weights = dropout(weights, rate, dropout_rng)
    return apply_attention_weights(weights, v)


class Attention(nnx.Module):
    """Attention with separate query, key and value projections (optionally biased).

    Params: ``w_q`` [D, N, H] (embed, heads, head_dim), ``w_k``/``w_v`` [D, K, H] (embed,
    kv_heads, head_dim), ``w_out`` [N, H, D] (heads, head_dim, embed); with ``use_bias`` also
    ``b_q`` [N, H], ``b_k``/``b_v`` [K, H] and ``b_out`` [D]. For self-attention the three input
    projections run as one matmul on their concatenated weights.

    ``key_projection=False`` creates no ``w_k``/``b_k`` (a module with its own keys, as LSH's
    shared query/key projection). An efficient family's kernel with random features
    (``attention_families.FamilyKernel``, performer/rfa) gets this layer's own draw as state,
    ``random_features`` [m, H] (``RandomFeatures``; None otherwise), passed to the kernel.

    ``capture_attention`` (a plain attribute, False unless set): sow the attention
    probabilities, see the module docstring.
    """

    LORA_BRANCH = True  # _project and _out add LoRA branches (nn.lora_branch)

    capture_attention: bool = False

    def __init__(self, d_model: int, n_heads: int, *, n_kv_heads: int | None = None,
                 head_dim: int | None = None, use_bias: bool = True, init_std: float = 0.02,
                 out_std: float | None = None, implementation: str | AttentionFn = "reference",
                 rope: Rope | None = None, scale: float | None = None, dropout: float = 0.0,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 key_projection: bool = True, rngs: nnx.Rngs):
        n_kv = n_kv_heads or n_heads
        h = head_dim or d_model // n_heads
        if n_heads % n_kv:
            raise ValueError(f"n_kv_heads={n_kv} must divide n_heads={n_heads}")
        self.dtype = dtype
        self.implementation = implementation
        self.rope = rope
        self.scale = scale
        self.dropout = dropout
        out_std = init_std if out_std is None else out_std
        self.w_q = normal_param(rngs, (d_model, n_heads, h), ("embed", "heads", "head_dim"),
                                init_std, param_dtype)
        self.w_k = (normal_param(rngs, (d_model, n_kv, h), ("embed", "kv_heads", "head_dim"),
                                 init_std, param_dtype) if key_projection else None)
        self.w_v = normal_param(rngs, (d_model, n_kv, h), ("embed", "kv_heads", "head_dim"),
                                init_std, param_dtype)
        self.w_out = normal_param(rngs, (n_heads, h, d_model), ("heads", "head_dim", "embed"),
                                  out_std, param_dtype)
        if use_bias:
            self.b_q = constant_param((n_heads, h), ("heads", "head_dim"), 0.0, param_dtype)
            self.b_k = (constant_param((n_kv, h), ("kv_heads", "head_dim"), 0.0, param_dtype)
                        if key_projection else None)
            self.b_v = constant_param((n_kv, h), ("kv_heads", "head_dim"), 0.0, param_dtype)
            self.b_out = constant_param((d_model,), ("embed",), 0.0, param_dtype)
        else:
            self.b_q = self.b_k = self.b_v = self.b_out = None
        # Drawn last, so the projections' draws are those of a layer without features.
        make_features = getattr(implementation, "make_features", None)
        self.random_features = None if make_features is None else make_features(rngs)

    def _project(self, x: jnp.ndarray, names: tuple[str, ...]) -> list[jnp.ndarray]:
        """x: [B, T, D] through the named projections as one [B*T, D] x [D, sum] matmul
        (plain 2-D operands keep the CPU matmul kernels on their fast path) -> [B, T, *, H]."""
        dt = self.dtype
        b, t, d = x.shape
        weights = [getattr(self, "w_" + n)[...].astype(dt) for n in names]
        widths = [w.shape[1] * w.shape[2] for w in weights]
        w = jnp.concatenate([w.reshape(d, -1) for w in weights], axis=1)
        x2 = x.astype(dt).reshape(b * t, d)
        y = x2 @ w
        if self.b_q is not None:
            y = y + jnp.concatenate([getattr(self, "b_" + n)[...].astype(dt).reshape(-1)
                                     for n in names])
        splits = jnp.split(y, [sum(widths[:i + 1]) for i in range(len(widths) - 1)], axis=1)
        out = []
        for name, s, w in zip(names, splits, weights, strict=True):
            extra = branch_output(self, "w_" + name, x2)
            out.append((s if extra is None else s + extra).reshape(b, t, w.shape[1],
                                                                     w.shape[2]))
        return out

    def context_kv(self, context: jnp.ndarray) -> LayerCache:
        """The keys and values cross-attention reads from ``context`` [B, S, D] (no rotary:
        cross-attention has none) -> LayerCache of [B, K, S, H] (heads first, as a decode
        cache) in the compute dtype."""
        k, v = self._project(context, ("k", "v"))
        return LayerCache(k=k.transpose(0, 2, 1, 3), v=v.transpose(0, 2, 1, 3))

    def __call__(self, x: jnp.ndarray, *, context: jnp.ndarray | None = None,
                 q_positions: jnp.ndarray | None = None, k_positions: jnp.ndarray | None = None,
                 mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                 is_causal: bool = False, segment_ids: jnp.ndarray | None = None,
                 window: int | None = None, cache: LayerCache | None = None,
                 cache_index: jnp.ndarray | None = None, context_kv: LayerCache | None = None,
                 dropout_rng: jax.Array | None = None) -> tuple[jnp.ndarray, LayerCache | None]:
        """x: [B, T, D]; context: [B, S, D] for cross-attention (None: self-attention);
        context_kv: the context's keys and values from ``context_kv`` (cross-attention while
        decoding: projected once per source instead of at every step; ``context`` unused).

        q_positions / k_positions: [B, T] / [B, S] int, the rotary positions (k defaults to q).
        mask, bias, is_causal, segment_ids, window: as in ``attention_kernels``.
        With a ``cache`` (self-attention decoding), this call's keys and values are written at
        ``cache_index`` and the queries attend over the whole cache: S = cache length, and the
        caller's ``mask`` must hide the cache slots not yet written.
        dropout_rng: drops attention weights at the module's rate (None: no dropout).
        -> ([B, T, D] in the compute dtype, updated cache or None).
        """
        dt = self.dtype
        b, t, d = x.shape
        if context_kv is not None:
            (q,) = self._project(x, ("q",))
            k, v = context_kv["k"].astype(dt), context_kv["v"].astype(dt)
        elif context is None:
            q, k, v = self._project(x, ("q", "k", "v"))
        else:
            (q,) = self._project(x, ("q",))
            k, v = self._project(context, ("k", "v"))
        if self.rope is not None:
            k_positions = q_positions if k_positions is None else k_positions
            q = apply_rope(q, q_positions, theta=self.rope.theta, fraction=self.rope.fraction)
            k = apply_rope(k, k_positions, theta=self.rope.theta, fraction=self.rope.fraction)
        if cache is not None and "s" in cache:  # linear attention: fold into the state
            out, cache = _linear_decode(q, k, v, cache, cache_index, mask)
            return self._out(out), cache
        heads_first = None  # the [B, K, S, H] keys and values of a cache or a context_kv
        if cache is not None and not isinstance(self.implementation, str):
            raise ValueError("an efficient attention family's kernel does not decode with a "
                             "KV cache")
        if cache is not None:
            k, v = (write_cache(cache[name], x.transpose(0, 2, 1, 3), cache_index, axis=2)
                    for name, x in (("k", k), ("v", v)))
            cache = LayerCache(k=k, v=v)
            heads_first = (k.astype(dt), v.astype(dt))
        elif context_kv is not None:
            heads_first = (k, v)
        kwargs = dict(mask=mask, bias=bias, is_causal=is_causal, scale=self.scale,
                      segment_ids=segment_ids, window=window)
        if heads_first is not None and not self.capture_attention:
            out = cached_attention(q, *heads_first, mask=mask, bias=bias, scale=self.scale,
                                   is_causal=is_causal, window=window)
        elif heads_first is not None:  # attention maps of a decode step: the reference path
            k, v = (x.transpose(0, 2, 1, 3) for x in heads_first)
            out = attend_and_sow(self, q, k, v, kwargs, self.dropout, dropout_rng)
        elif self.capture_attention:
            out = attend_and_sow(self, q, k, v, kwargs, self.dropout, dropout_rng)
        elif dropout_rng is not None and self.dropout > 0.0:
            # Only the reference kernel drops attention weights; the fused ones cannot.
            out = reference_attention(q, k, v, dropout_rate=self.dropout,
                                      dropout_rng=dropout_rng, **kwargs)
        else:
            kernel = (get_attention_fn(self.implementation)
                      if isinstance(self.implementation, str) else self.implementation)
            if self.random_features is not None:
                kwargs["features"] = self.random_features[...]
            out = kernel(q, k, v, **kwargs)  # [B, T, N, H]
        return self._out(out), cache

    def _out(self, out: jnp.ndarray) -> jnp.ndarray:
        """The heads' outputs [B, T, N, H] through w_out (and b_out) -> [B, T, D]."""
        dt = self.dtype
        b, t, n, h = out.shape
        d = self.w_out.shape[-1]
        flat = out.reshape(b * t, n * h)
        y = flat @ self.w_out[...].astype(dt).reshape(n * h, d)
        extra = branch_output(self, "w_out", flat)
        if extra is not None:
            y = y + extra
        if self.b_out is not None:
            y = y + self.b_out[...].astype(dt)
        return y.reshape(b, t, d)


def _linear_decode(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, cache: LinearCache,
                   cache_index: jnp.ndarray, mask: jnp.ndarray) -> tuple[jnp.ndarray,
                                                                         LinearCache]:
    """T new tokens at slots cache_index .. + T - 1 through a linear-attention state: a token
    joins it when the decode mask lets it see its own slot (left padding does not)."""
    b, t = q.shape[:2]
    slots = jnp.asarray(cache_index) + jnp.arange(t)  # [T] (or [B, T] with per-row indices)
    own = jnp.broadcast_to(slots, (b, t))[:, :, None]  # [B, T, 1]
    valid = jnp.take_along_axis(jnp.broadcast_to(mask[:, 0], (b, t, mask.shape[-1])), own,
                                axis=2)[..., 0]
    out, state = linear_attention_step(LinearState(cache["s"], cache["z"]), q, k, v,
                                       valid=valid)
    return out, LinearCache(slots=cache["slots"], s=state.s, z=state.z)
