"""Multi-head self-attention, attention masks, and the kernels behind them.

Letters: B batch, T query length, S key length, D model width, N heads, H head dim,
C the three projections (query, key, value).

Masks are boolean ``[B, 1, T, S]`` arrays, True where a query may attend to a key. Packing
puts several documents in one row; ``segment_ids`` keep them apart, and ``positions`` restart
at 0 for every document, so a packed row computes exactly what separate rows would.
"""

from __future__ import annotations

from typing import TypedDict

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.params import constant_param, normal_param

# The masked-score value: finite, so a row with every key masked (padding) gives a uniform
# softmax instead of NaN; any real score is far above it.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


class LayerCache(TypedDict):
    """Decode cache of one layer: keys and values of every position written so far."""

    k: jnp.ndarray  # [B, S, N, H]
    v: jnp.ndarray  # [B, S, N, H]


def causal_segment_mask(segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Causal mask restricted to each packed document.

    segment_ids: [B, T] int (0 for padding) -> [B, 1, T, T] bool.
    """
    t = segment_ids.shape[1]
    causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, S]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return (causal[None] & same)[:, None]


def decode_mask(batch: int, query_len: int, cache_len: int,
                cache_index: jnp.ndarray) -> jnp.ndarray:
    """Mask for decoding with a cache: query i sits at absolute index cache_index + i and sees
    every cached key at an index not after it. -> [B, 1, T, S] bool."""
    q_idx = cache_index + jnp.arange(query_len)  # [T]
    mask = jnp.arange(cache_len)[None, :] <= q_idx[:, None]  # [T, S]
    return jnp.broadcast_to(mask, (batch, 1, query_len, cache_len))


def reference_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                        mask: jnp.ndarray) -> jnp.ndarray:
    """softmax(q k^T / sqrt(H) + mask) v, the softmax in float32.

    q: [B, T, N, H], k and v: [B, S, N, H], mask: [B, 1|N, T, S] bool -> [B, T, N, H].
    """
    scale = q.shape[-1] ** -0.5
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask, scores, MASK_VALUE)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", weights, v)


def xla_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                  mask: jnp.ndarray) -> jnp.ndarray:
    """``jax.nn.dot_product_attention`` (XLA implementation); same shapes as the reference."""
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")


ATTENTION_IMPLEMENTATIONS = {"reference": reference_attention, "xla": xla_attention}


class MultiHeadAttention(nnx.Module):
    """Multi-head attention with a fused QKV projection and biases (GPT-2 layout)."""

    def __init__(self, d_model: int, n_heads: int, *, init_std: float, out_std: float,
                 implementation: str, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs):
        head_dim = d_model // n_heads
        self.dtype = dtype
        self.attend = ATTENTION_IMPLEMENTATIONS[implementation]
        self.w_qkv = normal_param(rngs, (d_model, 3, n_heads, head_dim),
                                  ("embed", None, "heads", "head_dim"), init_std, param_dtype)
        self.b_qkv = constant_param((3, n_heads, head_dim), (None, "heads", "head_dim"), 0.0,
                                    param_dtype)
        self.w_out = normal_param(rngs, (n_heads, head_dim, d_model),
                                  ("heads", "head_dim", "embed"), out_std, param_dtype)
        self.b_out = constant_param((d_model,), ("embed",), 0.0, param_dtype)

    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, cache: LayerCache | None = None,
                 cache_index: jnp.ndarray | None = None) -> tuple[jnp.ndarray, LayerCache | None]:
        """x: [B, T, D], mask: [B, 1, T, S] -> ([B, T, D], updated cache).

        Without a cache S == T. With one, this call's keys and values are written at
        ``cache_index`` and the queries attend over the whole cache (S = cache length).
        """
        dt = self.dtype
        b, t, d = x.shape
        w_qkv = self.w_qkv[...]
        _, c, n, h = w_qkv.shape
        # One [B*T, D] x [D, 3*N*H] matmul: plain 2-D operands keep the CPU matmul kernels on
        # their fast path (an einsum with a 4-D weight measured ~20% slower there).
        qkv = x.astype(dt).reshape(b * t, d) @ w_qkv.astype(dt).reshape(d, c * n * h)
        qkv = (qkv + self.b_qkv[...].astype(dt).reshape(-1)).reshape(b, t, c, n, h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), start)
            v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), start)
            cache = LayerCache(k=k, v=v)
        out = self.attend(q, k.astype(dt), v.astype(dt), mask)  # [B, T, N, H]
        y = out.reshape(b * t, n * h) @ self.w_out[...].astype(dt).reshape(n * h, d)
        return (y + self.b_out[...].astype(dt)).reshape(b, t, d), cache
