"""Attention kernels behind one signature, and the per-backend choice between them.

Letters: B batch, T query length, S key length, N query heads, K key/value heads (K divides N:
K == N is multi-head, 1 < K < N grouped-query, K == 1 multi-query), G = N // K query heads per
key/value head, H head dim.

Every kernel is ``fn(q, k, v, *, mask=None, bias=None, is_causal=False, scale=None,
segment_ids=None, window=None) -> [B, T, N, H]`` with q: [B, T, N, H], k and v: [B, S, K, H],
mask: [B|1, 1|N, T, S] bool (True = may attend), bias: [B|1, N|1, T, S] float added to the
scaled scores, scale defaulting to 1/sqrt(H). Query head n reads key/value head n // G.

The visible set is the AND of ``mask``, ``is_causal`` (key s <= query t, top-left aligned),
``segment_ids`` ([B, T] int, self-attention only, equal ids attend; 0 = padding) and ``window``
(Mistral sliding window, ``t - window < s <= t``; see ``masks``). The last three describe the
mask by structure rather than as a [T, S] array, so the fused kernels can skip hidden blocks;
a dense ``mask`` or ``bias`` can express anything, but only some kernels take one:

    kernel      backend  dense mask  bias  segment_ids  window  dtypes / shapes
    reference   any      yes         yes   yes          yes     any
    blocked     any      yes         yes   yes          yes     any (skips blocks if T == S)
    xla         any      yes         yes   yes          yes     any
    cudnn       gpu      yes         yes   yes (dense)  yes     bf16/fp16; H % 8 == 0
    flash       gpu      -           -     yes          -       T == S, T % 128 == 0
    splash      tpu      -           -     yes          yes     T, S % 128 == 0

An input a kernel cannot take (a "-" above, or a dtype/shape outside its last column) does not
fail: the call falls back to "xla" and warns once per trace with the reason, so a model runs
everywhere and a benchmark shows the cliff. Bad inputs (K not dividing N, segment_ids with
T != S) raise ValueError in every kernel.
"""

from __future__ import annotations

import functools
import warnings
from typing import Protocol

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from jaxformer.nn.dropout import dropout
from jaxformer.nn.masks import MASK_VALUE, causal_mask, segment_mask, sliding_window_mask
from jaxformer.parallel.sharding import active_sharding, is_split, logical_to_spec
from jaxformer.parallel.target import target_platform


class AttentionFn(Protocol):
    def __call__(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                 mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                 is_causal: bool = False, scale: float | None = None,
                 segment_ids: jnp.ndarray | None = None,
                 window: int | None = None) -> jnp.ndarray: ...


def _check_shapes(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                  segment_ids: jnp.ndarray | None) -> None:
    b, t, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"attention expects q [B,T,N,H] and k, v [B,S,K,H]; got "
                         f"q {q.shape}, k {k.shape}, v {v.shape}")
    if n % k.shape[2]:
        raise ValueError(f"key/value heads ({k.shape[2]}) must divide query heads ({n})")
    if segment_ids is not None and (segment_ids.shape != (b, t) or k.shape[1] != t):
        raise ValueError(f"segment_ids [B, T] need self-attention (T == S); got segment_ids "
                         f"{segment_ids.shape}, T={t}, S={k.shape[1]}")


def dense_mask(q_len: int, k_len: int, *, mask: jnp.ndarray | None = None,
               is_causal: bool = False, segment_ids: jnp.ndarray | None = None,
               window: int | None = None) -> jnp.ndarray | None:
    """The AND of every mask argument as one [B|1, 1|N, T, S] bool array (None: all visible)."""
    parts = [mask] if mask is not None else []
    if window is not None:
        parts.append(sliding_window_mask(q_len, k_len, window=window))  # causal included
    elif is_causal:
        parts.append(causal_mask(q_len, k_len))
    if segment_ids is not None:
        parts.append(segment_mask(segment_ids))
    return functools.reduce(jnp.logical_and, parts) if parts else None


def attention_weights(q: jnp.ndarray, k: jnp.ndarray, *, mask: jnp.ndarray | None = None,
                      bias: jnp.ndarray | None = None, is_causal: bool = False,
                      scale: float | None = None, segment_ids: jnp.ndarray | None = None,
                      window: int | None = None) -> jnp.ndarray:
    """softmax(q k^T * scale + bias, hidden keys at MASK_VALUE) over the keys, in float32.

    q: [B, T, N, H], k: [B, S, K, H], the masks as in the kernels -> [B, N, T, S] float32:
    every row sums to 1 and hidden keys get exactly 0 (a row with every key hidden is
    uniform). The first half of ``reference_attention``; attention maps read it directly.
    """
    _check_shapes(q, k, k, segment_ids)
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    scale = h**-0.5 if scale is None else scale
    # Grouping the query heads keeps K/V un-repeated: no [B, S, N, H] copy for GQA/MQA.
    q5 = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", q5, k, preferred_element_type=jnp.float32)
    return _masked_softmax(scores.reshape(b, n, t, s) * scale, bias=bias, mask=mask,
                           is_causal=is_causal, segment_ids=segment_ids, window=window)


def _masked_softmax(scores: jnp.ndarray, *, bias: jnp.ndarray | None,
                    mask: jnp.ndarray | None, is_causal: bool,
                    segment_ids: jnp.ndarray | None = None,
                    window: int | None = None) -> jnp.ndarray:
    """softmax over the keys of scaled scores [B, N, T, S] (float32) plus ``bias``, hidden keys
    at MASK_VALUE -> weights [B, N, T, S]."""
    t, s = scores.shape[2], scores.shape[3]
    if bias is not None:
        scores = scores + bias.astype(jnp.float32)
    visible = dense_mask(t, s, mask=mask, is_causal=is_causal, segment_ids=segment_ids,
                         window=window)
    if visible is not None:
        # Masking after the bias puts hidden keys at exactly MASK_VALUE, so a row with every
        # key hidden gives a uniform softmax rather than NaN.
        scores = jnp.where(visible, scores, MASK_VALUE)
    return jax.nn.softmax(scores, axis=-1)


def apply_attention_weights(weights: jnp.ndarray, v: jnp.ndarray) -> jnp.ndarray:
    """weights: [B, N, T, S] (cast to v's dtype), v: [B, S, K, H] -> [B, T, N, H]; query
    head n reads value head n // (N // K). The second half of ``reference_attention``."""
    b, n, t, s = weights.shape
    kv, h = v.shape[2], v.shape[3]
    w5 = weights.astype(v.dtype).reshape(b, kv, n // kv, t, s)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", w5, v)
    return out.reshape(b, t, n, h)


def cached_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                     mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                     is_causal: bool = False, scale: float | None = None,
                     window: int | None = None) -> jnp.ndarray:
    """The reference formula over a decode cache, whose keys and values are heads first.

    q: [B, T, N, H]; k, v: [B, K, S, H] (``LayerCache``); masks and bias as in
    ``reference_attention`` -> [B, T, N, H]. With the heads before the slots both products are
    plain batched matmuls over (B, K) that read the cache in place.
    """
    b, t, n, h = q.shape
    kv, s = k.shape[1], k.shape[2]
    if n % kv:
        raise ValueError(f"key/value heads ({kv}) must divide query heads ({n})")
    scale = h**-0.5 if scale is None else scale
    q5 = q.reshape(b, t, kv, n // kv, h)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", q5, k, preferred_element_type=jnp.float32)
    weights = _masked_softmax(scores.reshape(b, n, t, s) * scale, bias=bias, mask=mask,
                              is_causal=is_causal, window=window)
    weights = weights.astype(v.dtype).reshape(b, kv, n // kv, t, s)
    return jnp.einsum("BKGTS,BKSH->BTKGH", weights, v).reshape(b, t, n, h)


def reference_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                        mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                        is_causal: bool = False, scale: float | None = None,
                        segment_ids: jnp.ndarray | None = None,
                        window: int | None = None, dropout_rate: float = 0.0,
                        dropout_rng: jax.Array | None = None) -> jnp.ndarray:
    """softmax(q k^T * scale + bias, hidden keys at MASK_VALUE) v, scores and softmax in float32.

    The textbook formula in two einsums (``attention_weights``, then
    ``apply_attention_weights``); the yardstick the other kernels are checked against.
    The only kernel with dropout on the attention weights (``dropout_rng`` given, rate > 0).
    """
    _check_shapes(q, k, v, segment_ids)
    weights = attention_weights(q, k, mask=mask, bias=bias, is_causal=is_causal, scale=scale,
                                segment_ids=segment_ids, window=window)
    return apply_attention_weights(dropout(weights, dropout_rate, dropout_rng), v)


def blocked_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                      mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                      is_causal: bool = False, scale: float | None = None,
                      segment_ids: jnp.ndarray | None = None, window: int | None = None,
                      block: int = 64) -> jnp.ndarray:
    """The reference formula, query block by query block, skipping the key blocks that the
    causal mask (or sliding window) hides entirely.

    For causal self-attention with T = S = nb·block, query block i only sees key blocks 0..i
    (window: the last ceil(window/block)+1 of those), so the score and value products and the
    softmax cover (nb + 1)/(2·nb) of the [T, S] square instead of all of it: 62.5% at nb = 4.
    Each block is ``reference_attention`` on its slice of keys, with the slice of the dense
    mask and bias, so the result is the reference's up to float32 summation order. Without a
    causal mask or window nothing can be skipped and this is ``reference_attention``; T != S or
    T not a multiple of ``block`` also run the reference, and so does sequence parallelism
    (the length axis split over devices), where slicing the sequence into blocks would move
    every block between devices (measured 1.4x slower than the reference on 8 fake devices). A
    CPU kernel: fused GPU/TPU kernels skip hidden blocks on their own.
    """
    _check_shapes(q, k, v, segment_ids)
    b, t, n, h = q.shape
    s = k.shape[1]
    kwargs = dict(mask=mask, bias=bias, is_causal=is_causal, scale=scale,
                  segment_ids=segment_ids, window=window)
    if (not (is_causal or window is not None) or t != s or t % block or t == block
            or is_split("length")):
        return reference_attention(q, k, v, **kwargs)
    visible = dense_mask(t, s, mask=mask, is_causal=is_causal, segment_ids=segment_ids,
                         window=window)  # [B|1, 1|N, T, S], causal (or window) included
    outs = []
    for start in range(0, t, block):
        stop = start + block  # keys at or after `stop` are hidden for every query of the block
        lo = 0 if window is None else max(0, (start - window + 1) // block * block)
        block_bias = None if bias is None else bias[..., start:stop, lo:stop]
        outs.append(reference_attention(
            q[:, start:stop], k[:, lo:stop], v[:, lo:stop],
            mask=visible[..., start:stop, lo:stop], bias=block_bias, scale=scale))
    return jnp.concatenate(outs, axis=1)


def _jax_nn_attention(implementation: str, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                      mask: jnp.ndarray | None, bias: jnp.ndarray | None, is_causal: bool,
                      scale: float | None, segment_ids: jnp.ndarray | None,
                      window: int | None) -> jnp.ndarray:
    _check_shapes(q, k, v, segment_ids)
    # is_causal and the window go in as flags (cuDNN skips the hidden blocks); only the packing
    # constraint has to become a dense mask.
    dense = dense_mask(q.shape[1], k.shape[1], mask=mask, segment_ids=segment_ids)
    return jax.nn.dot_product_attention(
        q, k, v, bias=bias, mask=dense, scale=scale, is_causal=is_causal or window is not None,
        local_window_size=None if window is None else (window - 1, 0),
        implementation=implementation)


def xla_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                  mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                  is_causal: bool = False, scale: float | None = None,
                  segment_ids: jnp.ndarray | None = None,
                  window: int | None = None) -> jnp.ndarray:
    """``jax.nn.dot_product_attention(implementation="xla")``: runs on every backend."""
    return _jax_nn_attention("xla", q, k, v, mask=mask, bias=bias, is_causal=is_causal,
                             scale=scale, segment_ids=segment_ids, window=window)


def _fall_back(name: str, reason: str, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
               **kwargs) -> jnp.ndarray:
    # stacklevel 3: the line that called the kernel, so the warning points at the model.
    warnings.warn(f"attention kernel {name!r} cannot take {reason}; using 'xla'", stacklevel=3)
    return xla_attention(q, k, v, **kwargs)


def cudnn_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                    mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                    is_causal: bool = False, scale: float | None = None,
                    segment_ids: jnp.ndarray | None = None,
                    window: int | None = None) -> jnp.ndarray:
    """cuDNN fused flash attention via ``jax.nn.dot_product_attention`` (NVIDIA GPU only).

    Falls back to "xla" for float32 inputs or a head dim that is not a multiple of 8; other
    cuDNN limits (head dim over 128 before Hopper, odd T or S with a bias in training) raise
    cuDNN's own NotImplementedError.
    """
    _check_shapes(q, k, v, segment_ids)
    kwargs = dict(mask=mask, bias=bias, is_causal=is_causal, scale=scale,
                  segment_ids=segment_ids, window=window)
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return _fall_back("cudnn", f"dtype {q.dtype} (bfloat16/float16 only)", q, k, v, **kwargs)
    if q.shape[-1] % 8:
        return _fall_back("cudnn", f"head dim {q.shape[-1]} (a multiple of 8 only)", q, k, v,
                          **kwargs)
    return _jax_nn_attention("cudnn", q, k, v, **kwargs)


def _repeat_kv(x: jnp.ndarray, groups: int) -> jnp.ndarray:
    """[B, S, K, H] -> [B, S, K*G, H], head k*G + g = head k (the order query heads group in)."""
    return x if groups == 1 else jnp.repeat(x, groups, axis=2)


def flash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                    mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                    is_causal: bool = False, scale: float | None = None,
                    segment_ids: jnp.ndarray | None = None, window: int | None = None,
                    interpret: bool = False) -> jnp.ndarray:
    """The Pallas (Triton) flash-attention kernel, ``jax.experimental.pallas.ops.gpu.attention``.

    Takes causal and segment ids only (no dense mask, bias or window: those fall back to "xla"),
    self-attention with T a multiple of its 128-query blocks. Grouped K/V heads are repeated up
    to N, since the kernel pairs query head n with key head n. ``interpret=True`` runs the
    kernel in the Pallas interpreter, which works on CPU (tests).
    """
    _check_shapes(q, k, v, segment_ids)
    kwargs = dict(mask=mask, bias=bias, is_causal=is_causal, scale=scale,
                  segment_ids=segment_ids, window=window)
    b, t, n, h = q.shape
    unsupported = [name for name, x in (("a dense mask", mask), ("a bias", bias),
                                        ("a sliding window", window)) if x is not None]
    if k.shape[1] != t or t % 128:
        unsupported.append(f"T={t}, S={k.shape[1]} (needs T == S, a multiple of 128)")
    if unsupported:
        return _fall_back("flash", " or ".join(unsupported), q, k, v, **kwargs)

    from jax.experimental.pallas.ops.gpu import attention as pallas_gpu

    groups = n // k.shape[2]
    return pallas_gpu.mha(
        q, _repeat_kv(k, groups), _repeat_kv(v, groups),
        None if segment_ids is None else segment_ids.astype(jnp.int32),
        sm_scale=h**-0.5 if scale is None else scale, causal=is_causal, interpret=interpret)


@functools.lru_cache(maxsize=64)
def _splash_kernel(n: int, t: int, s: int, is_causal: bool, window: int | None,
                   interpret: bool):
    """Builds (once per shape and mask) the splash kernel for one example: q [N, T, H]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if window is not None:
        head_mask = splash.LocalMask((t, s), window_size=(window - 1, 0), offset=0)
    elif is_causal:
        head_mask = splash.CausalMask((t, s))
    else:
        head_mask = splash.FullMask((t, s))
    # The mask metadata is numpy work at build time; keep it out of any surrounding trace so
    # the cached kernel holds concrete arrays, not tracers of a finished jit.
    with jax.ensure_compile_time_eval():
        return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * n), head_shards=1,
                                      q_seq_shards=1, interpret=interpret)


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                     mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                     is_causal: bool = False, scale: float | None = None,
                     segment_ids: jnp.ndarray | None = None, window: int | None = None,
                     interpret: bool = False) -> jnp.ndarray:
    """The Pallas TPU splash-attention kernel (block-sparse flash attention).

    Takes causal, sliding window and segment ids natively, and grouped K/V heads without
    repeating them; a dense mask or bias falls back to "xla", as do T or S not multiples of
    its 128 blocks. ``interpret=True`` runs it in the Pallas interpreter (CPU tests).
    """
    _check_shapes(q, k, v, segment_ids)
    kwargs = dict(mask=mask, bias=bias, is_causal=is_causal, scale=scale,
                  segment_ids=segment_ids, window=window)
    b, t, n, h = q.shape
    s = k.shape[1]
    unsupported = [name for name, x in (("a dense mask", mask), ("a bias", bias)) if x is not None]
    if t % 128 or s % 128:
        unsupported.append(f"T={t}, S={s} (multiples of 128 only)")
    if unsupported:
        return _fall_back("splash", " or ".join(unsupported), q, k, v, **kwargs)

    # Splash takes no scale: fold it into q, as MaxText does.
    q = q * jnp.asarray(h**-0.5 if scale is None else scale, q.dtype)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)

    def local(q, k, v, seg):  # one device's rows and heads
        kernel = _splash_kernel(q.shape[2], t, s, is_causal, window, interpret)
        q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, N|K, T|S, H]
        if seg is None:
            out = jax.vmap(kernel)(q, k, v)
        else:
            from jax.experimental.pallas.ops.tpu import splash_attention as splash

            out = jax.vmap(lambda q, k, v, seg: kernel(
                q, k, v, splash.SegmentIds(q=seg, kv=seg)))(q, k, v, seg)
        return out.transpose(0, 2, 1, 3)

    active = active_sharding()
    if active is None or active[0].size == 1:
        return local(q, k, v, seg)
    # A Pallas kernel cannot be partitioned by XLA: run it per device under shard_map, rows
    # split as the batch is and heads as the activations' heads are (the sequence stays whole:
    # with sequence parallelism the keys are gathered first).
    mesh, rules = active
    q_spec = logical_to_spec(("batch", None, "act_heads", None), rules, q.shape, mesh)
    kv_spec = logical_to_spec(("batch", None, "act_heads", None), rules, k.shape, mesh)
    if q_spec[2] != kv_spec[2]:  # K/V heads do not split like the query heads: keep all heads
        q_spec = kv_spec = P(q_spec[0], None, None, None)
    seg_spec = P(q_spec[0], None)
    if seg is None:
        fn = jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh,
                           in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                           check_vma=False)
        return fn(q, k, v)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec),
                       out_specs=q_spec, check_vma=False)
    return fn(q, k, v, seg)


IMPLEMENTATIONS: dict[str, AttentionFn] = {
    "reference": reference_attention,
    "blocked": blocked_attention,
    "xla": xla_attention,
    "cudnn": cudnn_attention,
    "flash": flash_attention,
    "splash": splash_attention,
}

# What each backend can run, and what "auto" picks there. On CPU "blocked" is "reference" for
# bidirectional attention and more than twice as fast for causal self-attention at T = 256
# (B=8, N=4, H=64, float32, 2 cores, forward+backward: 12.2 vs 28.2 ms), where "xla" and
# "reference" are within a few percent of each other; see scripts/bench_attention.py.
BACKEND_IMPLEMENTATIONS: dict[str, tuple[str, ...]] = {
    "cpu": ("reference", "blocked", "xla"),
    "gpu": ("reference", "blocked", "xla", "cudnn", "flash"),
    "tpu": ("reference", "blocked", "xla", "splash"),
}
AUTO: dict[str, str] = {"cpu": "blocked", "gpu": "cudnn", "tpu": "splash"}
# "flash" names the backend's Pallas flash kernel: on TPU that is splash.
_ALIASES: dict[tuple[str, str], str] = {("flash", "tpu"): "splash"}


def resolve_implementation(name: str, backend: str) -> str:
    """The concrete kernel ``name`` means on ``backend`` ("cpu", "gpu", "tpu"), a key of
    IMPLEMENTATIONS. "auto" picks the backend's fastest; an unavailable choice raises."""
    if backend not in BACKEND_IMPLEMENTATIONS:
        raise ValueError(f"unknown backend {backend!r} for attention; known: "
                         f"{', '.join(BACKEND_IMPLEMENTATIONS)}")
    resolved = AUTO[backend] if name == "auto" else _ALIASES.get((name, backend), name)
    valid = BACKEND_IMPLEMENTATIONS[backend]
    if resolved not in valid:
        choices = ("auto",) + valid + tuple(alias for alias, b in _ALIASES if b == backend)
        raise ValueError(f"attention implementation {name!r} is not available on backend "
                         f"{backend!r}; choose one of: {', '.join(choices)}")
    return resolved


def get_attention_fn(name: str = "auto", backend: str | None = None) -> AttentionFn:
    """The kernel ``name`` resolves to on ``backend`` (default: the platform traced for,
    ``target_platform()``)."""
    return IMPLEMENTATIONS[resolve_implementation(name, backend or target_platform())]
