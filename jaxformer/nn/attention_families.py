"""The efficient attention families, each one value of ``model.attention_type``.

Letters: B batch, T length, D model width, N query heads, K key/value heads, H head dim.

Two kinds of family:

- **Kernel families** keep multi-head attention's projections (``Attention``: w_q, w_k, w_v,
  w_out, rotary embeddings) and replace only the softmax(QK^T)V kernel:
  ``longformer`` and ``bigbird`` (``block_sparse``), ``performer`` and ``rfa``
  (``random_features``), ``linear`` (``linear_attention``). ``FamilyKernel`` holds a
  family's options and is called like any ``attention_kernels.AttentionFn``.
- **Module families** have their own projections: ``lsh`` (Reformer: one shared query/key
  projection, ``LSHAttention`` below) and ``aft_full`` / ``aft_local`` / ``aft_simple`` (the
  Attention Free Transformer, ``aft.AFT``).

Every family runs self-attention in the training and evaluation forward pass, causal
(decoders) or not (encoders), with packed documents (``segment_ids``). Cross-attention stays
dense. What a family cannot take (an attention mask or additive bias: prefix-LM, ALiBi, T5 or
Shaw relative positions; a sliding window; decoding with a KV cache) is refused when the
config is validated (``jaxformer.config``), so a run never starts with a choice it cannot
finish.

Random draws: Performer/RFA features and LSH rotations come from a fixed key per family
(``seed``), the same at every step, so that evaluation and a resumed run compute the same
function as training did. (Performer's periodic redraw is not done.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxformer.nn.attention import Attention
from jaxformer.nn.block_sparse import block_sparse_attention
from jaxformer.nn.linear_attention import linear_attention
from jaxformer.nn.lsh_attention import lsh_attention
from jaxformer.nn.positional import apply_rope
from jaxformer.nn.random_features import (
    draw_gaussian_features,
    draw_orthogonal_features,
    favor_attention,
    rfa_attention,
)

KERNEL_FAMILIES = ("longformer", "bigbird", "performer", "rfa", "linear")
AFT_FAMILIES = ("aft_full", "aft_local", "aft_simple")
MODULE_FAMILIES = ("lsh", *AFT_FAMILIES)
FAMILIES = KERNEL_FAMILIES + MODULE_FAMILIES
FEATURE_SEED = 0  # the fixed key of Performer/RFA features and LSH rotations


def _no_mask(name: str, mask: jnp.ndarray | None, bias: jnp.ndarray | None,
             window: int | None) -> None:
    # The config refuses these choices; this guards direct use of the kernel.
    if mask is not None or bias is not None or window is not None:
        raise ValueError(f"attention_type={name!r} takes no attention mask, additive bias or "
                         "sliding window (only is_causal and segment_ids)")


@dataclasses.dataclass(frozen=True)
class FamilyKernel:
    """The kernel of kernel family ``name`` (one of KERNEL_FAMILIES) with its options, called
    like any ``attention_kernels.AttentionFn``. A frozen dataclass rather than a closure: the
    model keeps it as a static attribute, and two layers (or two builds) with the same options
    must compare equal (scanned layers, compile caches).

    block: longformer/bigbird block, the causal chunk of the others; sparse_window, n_global,
    n_random: the block-sparse pattern; features: performer/rfa features per head.
    """

    name: str
    block: int = 64
    sparse_window: int = 1
    n_global: int = 1
    n_random: int = 0
    features: int = 64
    head_dim: int = 64
    seed: int = FEATURE_SEED

    def __post_init__(self):
        if self.name not in KERNEL_FAMILIES:
            raise ValueError(f"unknown kernel family {self.name!r}; known: "
                             f"{', '.join(KERNEL_FAMILIES)}")

    def __call__(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                 mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                 is_causal: bool = False, scale: float | None = None,
                 segment_ids: jnp.ndarray | None = None,
                 window: int | None = None) -> jnp.ndarray:
        """q [B, T, N, H], k, v [B, T, K, H] -> [B, T, N, H]."""
        _no_mask(self.name, mask, bias, window)
        if self.name in ("longformer", "bigbird"):
            return block_sparse_attention(
                q, k, v, block=self.block, window=self.sparse_window, n_global=self.n_global,
                n_random=self.n_random if self.name == "bigbird" else 0, seed=self.seed,
                is_causal=is_causal, scale=scale, segment_ids=segment_ids)
        if self.name == "linear":  # elu+1 features: no scale (it cancels in the ratio)
            return linear_attention(q, k, v, is_causal=is_causal, segment_ids=segment_ids,
                                    chunk=self.block)
        key = jax.random.key(self.seed)
        if self.name == "performer":
            w = draw_orthogonal_features(key, self.features, self.head_dim)
            return favor_attention(q, k, v, w, is_causal=is_causal, scale=scale,
                                   segment_ids=segment_ids, chunk=self.block)
        w = draw_gaussian_features(key, self.features, self.head_dim)
        return rfa_attention(q, k, v, w, is_causal=is_causal, segment_ids=segment_ids,
                             chunk=self.block)


class LSHAttention(Attention):
    """Reformer's LSH attention (Kitaev et al. 2020): ``Attention`` with one shared
    query/key projection (``w_q``, here the shared QK; no ``w_k``), bucketed by
    ``lsh_attention``. Needs K == N (one key per query head).

    Params: ``w_q`` (shared QK) [D, N, H], ``w_v`` [D, N, H], ``w_out`` [N, H, D], biases.
    """

    def __init__(self, d_model: int, n_heads: int, *, n_hashes: int, n_buckets: int,
                 chunk: int, seed: int = FEATURE_SEED, **kwargs):
        super().__init__(d_model, n_heads, **kwargs)
        self.w_k = self.b_k = None
        self.n_hashes, self.n_buckets, self.chunk, self.seed = n_hashes, n_buckets, chunk, seed

    def __call__(self, x: jnp.ndarray, *, q_positions: jnp.ndarray | None = None,
                 is_causal: bool = False, segment_ids: jnp.ndarray | None = None,
                 mask=None, bias=None, window=None, cache=None, dropout_rng=None,
                 **unused) -> tuple[jnp.ndarray, None]:
        """x [B, T, D] -> ([B, T, D], None: no KV cache)."""
        _no_mask("lsh", mask, bias, window)
        if cache is not None:
            raise ValueError("attention_type='lsh' does not decode with a KV cache")
        qk, v = self._project(x, ("q", "v"))
        if self.rope is not None:
            qk = apply_rope(qk, q_positions, theta=self.rope.theta, fraction=self.rope.fraction)
        out = lsh_attention(qk, v, n_hashes=self.n_hashes, n_buckets=self.n_buckets,
                            chunk=self.chunk, key=jax.random.key(self.seed),
                            is_causal=is_causal, scale=self.scale, segment_ids=segment_ids)
        return self._out(out), None


def is_family(attention_type: str) -> bool:
    """Whether ``model.attention_type`` names an efficient family (not mha or mla)."""
    return attention_type in FAMILIES


def aft_variant(attention_type: str) -> str:
    """'aft_full' -> 'full' (the ``aft.AFT`` variant)."""
    return attention_type.removeprefix("aft_")

