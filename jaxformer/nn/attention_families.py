"""The efficient attention families, each one value of ``model.attention_type``.

Letters: B batch, T length, D model width, N query heads, K key/value heads, H head dim.

Two kinds of family:

- **Kernel families** keep multi-head attention's projections (``Attention``: w_q, w_k, w_v,
  w_out, rotary embeddings) and replace only the softmax(QK^T)V kernel:
  ``longformer`` and ``bigbird`` (``block_sparse``), ``performer`` and ``rfa``
  (``random_features``), ``linear`` (``linear_attention``). ``FamilyKernel`` holds a
  family's options and is called like any ``attention_kernels.AttentionFn`` (performer and
  rfa also take ``features=``, the layer's own draw, which ``Attention`` holds and passes).
- **Module families** have their own projections: ``lsh`` (Reformer: one shared query/key
  projection, ``LSHAttention`` below) and ``aft_full`` / ``aft_local`` / ``aft_simple`` (the
  Attention Free Transformer, ``aft.AFT``).

Every family runs self-attention in the training and evaluation forward pass, causal
(decoders) or not (encoders), with packed documents (``segment_ids``). Cross-attention stays
dense. What a family cannot take (an attention mask or additive bias: prefix-LM, ALiBi, T5 or
Shaw relative positions; a sliding window; decoding with a KV cache) is refused when the
config is validated (``jaxformer.config``), so a run never starts with a choice it cannot
finish.

Random draws: Performer/RFA features are state of each attention layer (``RandomFeatures``,
w [m, H], the param-dict key ``random_features``), drawn once per layer at init from the
layer's rngs, so layers do not share a draw. They sit in the parameter dict, so checkpoints
keep them and evaluation and a resumed run use the features training used; the kernel reads
them through ``stop_gradient`` and the optimizer leaves them alone (zero gradient, no weight
decay). With ``model.feature_redraw = k > 0`` the train step replaces them after every k-th
optimizer step by a fresh draw (``FeatureRedraw``: orthogonal for Performer, gaussian for RFA)
from a key that is a pure function of (train seed, step, the leaf's path), as Performer's
periodic redraw (Choromanski et al. 2021), so a resumed run redraws exactly as the
uninterrupted run would. LSH rotations and BigBird's random blocks come from a fixed key
(``seed``), the same at every step.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

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
FEATURE_SEED = 0  # the fixed key of LSH rotations and BigBird's random blocks
FEATURE_FAMILIES = ("performer", "rfa")  # the families with random features
FEATURES_NAME = "random_features"  # the attribute (and param-dict key) of a layer's features
_REDRAW_STREAM = 0x66656174  # "feat": keeps redraw keys apart from the dropout keys


class RandomFeatures(nnx.Variable):
    """A layer's Performer/RFA random features w [m, H] float32 (stacked [L, m, H] in the
    scanned layout): model state drawn at init, never trained (the kernel reads it through
    ``stop_gradient``); only ``FeatureRedraw`` changes it."""


def draw_features(family: str, key: jax.Array, m: int, h: int) -> jnp.ndarray:
    """A fresh draw of ``family``'s features -> w [m, h] float32: orthogonal (FAVOR+) for
    performer, iid gaussian for rfa."""
    if family == "performer":
        return draw_orthogonal_features(key, m, h)
    if family == "rfa":
        return draw_gaussian_features(key, m, h)
    raise ValueError(f"{family!r} has no random features; those that do: "
                     f"{', '.join(FEATURE_FAMILIES)}")


def entry_name(entry: Any) -> str:
    """A path entry (DictKey, GetAttrKey, SequenceKey or a plain key) -> its name as text."""
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def is_feature_path(path: Sequence[Any]) -> bool:
    """Whether a tree path (``jax.tree_util`` entries or plain keys) leads to random features:
    some entry is named ``random_features``, in the looped or the scanned layout, in a pure
    dict or an ``nnx.State``."""
    return any(entry_name(entry) == FEATURES_NAME for entry in path)


def without_features(tree: Any) -> Any:
    """``tree`` with its random-feature leaves taken out (None): what the optimizer trains,
    for parameter counts and norms."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: None if is_feature_path(path) else x, tree)


def _path_id(path: Sequence[Any]) -> int:
    """A stable 31-bit id of a tree path (crc32 of "blocks/0/attn/random_features"; Python's
    ``hash`` of a str changes between processes)."""
    text = "/".join(entry_name(entry) for entry in path)
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


@dataclasses.dataclass(frozen=True)
class FeatureRedraw:
    """Performer's periodic redraw (Choromanski et al. 2021): after every ``every``-th
    optimizer step, each ``random_features`` leaf of the parameters becomes a fresh draw of
    ``family`` (``draw_features``) from a key that is a pure function of (``seed``, step, the
    leaf's path), so a resumed run redraws exactly as the uninterrupted one. Traceable: the
    train step calls it on the traced step count."""

    family: str
    every: int
    seed: int = 0

    def __post_init__(self):
        if self.family not in FEATURE_FAMILIES or self.every < 1:
            raise ValueError(f"FeatureRedraw needs a family of {FEATURE_FAMILIES} and every "
                             f">= 1; got {self.family!r}, {self.every}")

    def __call__(self, params: Any, step: jax.Array) -> Any:
        """params (a pure dict, either layout) after the update that made the step count
        ``step`` -> params with fresh features where ``step % every == 0``, else the same."""
        due = step % self.every == 0
        base = jax.random.fold_in(
            jax.random.fold_in(jax.random.key(self.seed), _REDRAW_STREAM), step)

        def one(path, leaf):
            if not is_feature_path(path):
                return leaf
            key = jax.random.fold_in(base, _path_id(path))
            *lead, m, h = leaf.shape

            def fresh():
                keys = jax.random.split(key, math.prod(lead)) if lead else key[None]
                w = jax.vmap(lambda k: draw_features(self.family, k, m, h))(keys)
                return w.reshape(leaf.shape).astype(leaf.dtype)

            return jax.lax.cond(due, fresh, lambda: leaf)

        return jax.tree_util.tree_map_with_path(one, params)


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
    n_random: the block-sparse pattern; features: performer/rfa features per head (m), whose
    draw w [m, head_dim] the layer holds (``make_features``) and passes in each call.
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

    @property
    def needs_features(self) -> bool:
        return self.name in FEATURE_FAMILIES

    def make_features(self, rngs: nnx.Rngs) -> RandomFeatures | None:
        """The layer's own draw of random features (``RandomFeatures`` [m, head_dim], from
        ``rngs``), or None for a family without them."""
        if not self.needs_features:
            return None
        return RandomFeatures(draw_features(self.name, rngs.params(), self.features,
                                            self.head_dim))

    def __call__(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, *,
                 mask: jnp.ndarray | None = None, bias: jnp.ndarray | None = None,
                 is_causal: bool = False, scale: float | None = None,
                 segment_ids: jnp.ndarray | None = None, window: int | None = None,
                 features: jnp.ndarray | None = None) -> jnp.ndarray:
        """q [B, T, N, H], k, v [B, T, K, H] -> [B, T, N, H]; ``features``: the layer's
        random features w [m, H] (performer/rfa only, required there)."""
        _no_mask(self.name, mask, bias, window)
        if self.needs_features and features is None:
            raise ValueError(f"attention_type={self.name!r} needs the layer's random features "
                             "(features=w [m, H], see make_features)")
        if self.name in ("longformer", "bigbird"):
            return block_sparse_attention(
                q, k, v, block=self.block, window=self.sparse_window, n_global=self.n_global,
                n_random=self.n_random if self.name == "bigbird" else 0, seed=self.seed,
                is_causal=is_causal, scale=scale, segment_ids=segment_ids)
        if self.name == "linear":  # elu+1 features: no scale (it cancels in the ratio)
            return linear_attention(q, k, v, is_causal=is_causal, segment_ids=segment_ids,
                                    chunk=self.block)
        w = jax.lax.stop_gradient(features)  # drawn, never trained
        if self.name == "performer":
            return favor_attention(q, k, v, w, is_causal=is_causal, scale=scale,
                                   segment_ids=segment_ids, chunk=self.block)
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
        super().__init__(d_model, n_heads, key_projection=False, **kwargs)
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

