"""Multi-head latent attention (MLA; DeepSeek-V2, arXiv 2405.04434 section 2.1).

Letters: B batch, T query length, S key length, D model width, N heads, C the joint key-value
latent width (``kv_lora_rank``), Q the query latent width (``q_lora_rank``), P per-head query/key
channels without RoPE (``qk_nope_head_dim``), R the decoupled RoPE channels
(``qk_rope_head_dim``), V per-head value width (``v_head_dim``).

    queries   q = x W_q                      or  q = RMSNorm(x W_dq) W_uq      [B, T, N, P+R]
              q_nope, q_rope = q[..., :P], q[..., P:]
    latent    c_kv = RMSNorm(x W_dkv)                                         [B, T, C]
    rope key  k_rope = RoPE(x W_kr), one key shared by every head              [B, T, R]
    per head  k = concat(c_kv W_uk, k_rope)   [B, S, N, P+R],   v = c_kv W_uv  [B, S, N, V]
              attention(concat(q_nope, RoPE(q_rope)), k, v), scale 1/sqrt(P+R)
    output    y = concat_heads(out) W_o                                        [B, T, D]

The decode cache (``MLACache``) holds only ``c_kv`` and the roped ``k_rope``, C + R numbers per
position instead of 2 * N * H for multi-head attention; keys and values are up-projected from it
at every step.

Kernels: every kernel of ``attention_kernels`` wants q, k and v with one head dim, while here
V may differ from P + R. The module zero-pads q and k (and v) to H = max(P + R, V) and slices
the output back to V. Zero channels add nothing to q.k, and the softmax scale is passed
explicitly (1/sqrt(P+R), not the kernel's 1/sqrt(H)), so the padding changes no number; it costs
|P + R - V| extra channels of work and keeps every kernel (and its fast path) usable.

``absorb=True`` is the inference trick of the paper: W_uk is folded into the query
(q_nope W_uk^T, width C) and W_uv into the output, so attention runs as multi-query attention
directly over the cached latent (one key/value head of width C + R / C) and no per-head key or
value is ever materialized. It computes the same function (tests check it); it pays off when
the cache is long and T small (decoding).

No biases (DeepSeek's ``attention_bias=False``); RoPE is always applied to the decoupled part,
whatever the model's ``pos_encoding``.

``capture_attention`` (off by default) sows the attention probabilities [B, N, T, S] as in
``attention.Attention`` (the reference kernel's softmax; with ``absorb`` the same numbers, from
the latent keys).
"""

from __future__ import annotations

from typing import TypedDict

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.nn.attention import attend_and_sow, write_cache
from jaxformer.nn.attention_kernels import get_attention_fn, reference_attention
from jaxformer.nn.norms import RMSNorm
from jaxformer.nn.params import constant_param, normal_param
from jaxformer.nn.positional import apply_rope


class MLACache(TypedDict):
    """Decode cache of one MLA layer: nothing per head."""

    latent: jnp.ndarray  # [B, S, C] normalized joint key-value latent c_kv
    k_rope: jnp.ndarray  # [B, S, R] decoupled key, RoPE already applied


def _latent_norm(dim: int, axis: str, eps: float, param_dtype: jnp.dtype) -> RMSNorm:
    """RMSNorm over a latent, its scale named by the latent's logical axis (not ``embed``)."""
    norm = RMSNorm(dim, eps=eps, param_dtype=param_dtype)
    norm.scale = constant_param((dim,), (axis,), 1.0, param_dtype)
    return norm


def _pad_last(x: jnp.ndarray, width: int) -> jnp.ndarray:
    extra = width - x.shape[-1]
    return x if extra == 0 else jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


class MultiHeadLatentAttention(nnx.Module):
    """Self-attention with a low-rank joint key-value latent and a decoupled RoPE key.

    Params: ``w_q`` [D, N, P+R] (embed, heads, head_dim) or, with ``q_lora_rank`` > 0, ``w_dq``
    [D, Q] (embed, q_lora), ``q_norm`` (scale [Q], q_lora) and ``w_uq`` [Q, N, P+R] (q_lora,
    heads, head_dim); ``w_dkv`` [D, C] (embed, kv_lora), ``kv_norm`` (scale [C], kv_lora),
    ``w_kr`` [D, R] (embed, head_dim), ``w_uk`` [C, N, P] and ``w_uv`` [C, N, V] (kv_lora,
    heads, head_dim), ``w_out`` [N, V, D] (heads, head_dim, embed).

    ``capture_attention`` (a plain attribute, False unless set): sow the attention
    probabilities, see ``attention.Attention``.
    """

    capture_attention: bool = False

    def __init__(self, d_model: int, n_heads: int, *, kv_lora_rank: int, qk_rope_head_dim: int,
                 qk_nope_head_dim: int, v_head_dim: int, q_lora_rank: int = 0,
                 rope_theta: float = 10000.0, rope_interleaved: bool = False,
                 norm_eps: float = 1e-6, init_std: float = 0.02, out_std: float | None = None,
                 implementation: str = "reference", scale: float | None = None,
                 dropout: float = 0.0, absorb: bool = False, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        for name, value in (("kv_lora_rank", kv_lora_rank), ("qk_rope_head_dim", qk_rope_head_dim),
                            ("qk_nope_head_dim", qk_nope_head_dim), ("v_head_dim", v_head_dim)):
            if value <= 0:
                raise ValueError(f"MultiHeadLatentAttention: {name}={value} must be positive")
        if qk_rope_head_dim % 2:
            raise ValueError(f"MultiHeadLatentAttention: qk_rope_head_dim={qk_rope_head_dim} "
                             "must be even (RoPE rotates channel pairs)")
        self.dtype = dtype
        self.implementation = implementation
        self.rope_theta = rope_theta
        self.rope_interleaved = rope_interleaved
        self.dropout = dropout
        self.absorb = absorb
        self.kv_lora_rank = kv_lora_rank
        self.q_lora_rank = q_lora_rank
        self.qk_rope_head_dim = qk_rope_head_dim
        self.qk_nope_head_dim = qk_nope_head_dim
        self.v_head_dim = v_head_dim
        qk = qk_nope_head_dim + qk_rope_head_dim
        self.scale = qk**-0.5 if scale is None else scale
        out_std = init_std if out_std is None else out_std

        def normal(shape, axes, std=init_std):
            return normal_param(rngs, shape, axes, std, param_dtype)

        if q_lora_rank > 0:
            self.w_q = None
            self.w_dq = normal((d_model, q_lora_rank), ("embed", "q_lora"))
            self.q_norm = _latent_norm(q_lora_rank, "q_lora", norm_eps, param_dtype)
            self.w_uq = normal((q_lora_rank, n_heads, qk), ("q_lora", "heads", "head_dim"))
        else:
            self.w_q = normal((d_model, n_heads, qk), ("embed", "heads", "head_dim"))
            self.w_dq = self.q_norm = self.w_uq = None
        self.w_dkv = normal((d_model, kv_lora_rank), ("embed", "kv_lora"))
        self.kv_norm = _latent_norm(kv_lora_rank, "kv_lora", norm_eps, param_dtype)
        self.w_kr = normal((d_model, qk_rope_head_dim), ("embed", "head_dim"))
        self.w_uk = normal((kv_lora_rank, n_heads, qk_nope_head_dim),
                           ("kv_lora", "heads", "head_dim"))
        self.w_uv = normal((kv_lora_rank, n_heads, v_head_dim), ("kv_lora", "heads", "head_dim"))
        self.w_out = normal((n_heads, v_head_dim, d_model), ("heads", "head_dim", "embed"),
                            out_std)

    def _rope(self, x: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        return apply_rope(x, positions, theta=self.rope_theta, interleaved=self.rope_interleaved)

    def _attend(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, kwargs: dict,
                dropout_rng: jax.Array | None) -> jnp.ndarray:
        """The kernel on q [B,T,N,Hq], k [B,S,K,Hq], v [B,S,K,Hv], zero-padded to one head dim
        (see the module docstring) -> [B, T, N, Hv]."""
        hv = v.shape[-1]
        h = max(q.shape[-1], hv)
        q, k, v = _pad_last(q, h), _pad_last(k, h), _pad_last(v, h)
        if self.capture_attention:
            out = attend_and_sow(self, q, k, v, kwargs, self.dropout, dropout_rng)
        elif dropout_rng is not None and self.dropout > 0.0:
            out = reference_attention(q, k, v, dropout_rate=self.dropout,
                                      dropout_rng=dropout_rng, **kwargs)
        else:
            out = get_attention_fn(self.implementation)(q, k, v, **kwargs)
        return out[..., :hv]

    def __call__(self, x: jnp.ndarray, *, context: jnp.ndarray | None = None,
                 q_positions: jnp.ndarray | None = None, k_positions: jnp.ndarray | None = None,
                 mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                 is_causal: bool = False, segment_ids: jnp.ndarray | None = None,
                 window: int | None = None, cache: MLACache | None = None,
                 cache_index: jnp.ndarray | None = None,
                 dropout_rng: jax.Array | None = None) -> tuple[jnp.ndarray, MLACache | None]:
        """x: [B, T, D]; the keyword arguments as in ``attention.Attention`` (self-attention
        only: ``context`` raises; ``k_positions`` is ignored, the keys sit at ``q_positions``,
        which default to ``cache_index + arange(T)``). With a ``cache``, this call's latent and
        rope key are written at ``cache_index`` and the queries attend over the whole cache
        (the caller's ``mask`` hides unwritten slots). -> ([B, T, D] in the compute dtype,
        updated cache or None)."""
        if context is not None:
            raise ValueError("MultiHeadLatentAttention is self-attention only; got a context")
        dt = self.dtype
        b, t, d = x.shape
        c, r, p = self.kv_lora_rank, self.qk_rope_head_dim, self.qk_nope_head_dim
        if q_positions is None:
            start = 0 if cache_index is None else jnp.asarray(cache_index)[..., None]
            q_positions = jnp.broadcast_to(start + jnp.arange(t), (b, t))

        # Every projection out of x as one [B*T, D] matmul.
        first = self.w_q if self.w_q is not None else self.w_dq
        weights = [first[...].astype(dt).reshape(d, -1), self.w_dkv[...].astype(dt),
                   self.w_kr[...].astype(dt)]
        widths = [w.shape[1] for w in weights]
        y = x.astype(dt).reshape(b * t, d) @ jnp.concatenate(weights, axis=1)
        q, c_kv, k_rope = jnp.split(y, [widths[0], widths[0] + widths[1]], axis=1)
        if self.w_q is None:
            q = self.q_norm(q) @ self.w_uq[...].astype(dt).reshape(self.q_lora_rank, -1)
        q = q.reshape(b, t, -1, p + r)
        n = q.shape[2]
        q_nope, q_rope = q[..., :p], self._rope(q[..., p:], q_positions)
        c_kv = self.kv_norm(c_kv).reshape(b, t, c)
        k_rope = self._rope(k_rope.reshape(b, t, 1, r), q_positions)[:, :, 0]  # [B, T, R]

        if cache is not None:
            latent = write_cache(cache["latent"], c_kv, cache_index)
            rope_keys = write_cache(cache["k_rope"], k_rope, cache_index)
            cache = MLACache(latent=latent, k_rope=rope_keys)
            c_kv, k_rope = latent.astype(dt), rope_keys.astype(dt)
        s = c_kv.shape[1]

        kwargs = dict(mask=mask, bias=bias, is_causal=is_causal, scale=self.scale,
                      segment_ids=segment_ids, window=window)
        w_uk, w_uv = self.w_uk[...].astype(dt), self.w_uv[...].astype(dt)
        if self.absorb:
            # q_nope . (c_kv W_uk) == (q_nope W_uk^T) . c_kv: attend over the latent itself,
            # as multi-query attention with one key/value head.
            q_lat = jnp.einsum("BTNP,CNP->BTNC", q_nope, w_uk)
            q_all = jnp.concatenate([q_lat, q_rope], axis=-1)  # [B, T, N, C+R]
            k_all = jnp.concatenate([c_kv, k_rope], axis=-1)[:, :, None, :]  # [B, S, 1, C+R]
            out_lat = self._attend(q_all, k_all, c_kv[:, :, None, :], kwargs, dropout_rng)
            out = jnp.einsum("BTNC,CNV->BTNV", out_lat, w_uv)
        else:
            k_nope = (c_kv.reshape(b * s, c) @ w_uk.reshape(c, -1)).reshape(b, s, n, p)
            v = (c_kv.reshape(b * s, c) @ w_uv.reshape(c, -1)).reshape(b, s, n, -1)
            k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope[:, :, None, :], (b, s, n, r))],
                                axis=-1)
            q_all = jnp.concatenate([q_nope, q_rope], axis=-1)
            out = self._attend(q_all, k, v, kwargs, dropout_rng)  # [B, T, N, V]
        hv = out.shape[-1]
        y = out.reshape(b * t, n * hv) @ self.w_out[...].astype(dt).reshape(n * hv, d)
        return y.reshape(b, t, d), cache
