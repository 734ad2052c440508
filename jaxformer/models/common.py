"""What every architecture shares: dtypes, token embedding with positions, attention biases,
the Transformer block, and the un-embedding.

Letters: B batch, T query length, S key length, D model width, N heads, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.nn.aft import AFT
from jaxformer.nn.attention import Attention, LayerCache, Rope
from jaxformer.nn.attention_families import (
    AFT_FAMILIES,
    KERNEL_FAMILIES,
    FamilyKernel,
    LSHAttention,
    aft_variant,
)
from jaxformer.nn.dropout import dropout
from jaxformer.nn.embedding import Embedding
from jaxformer.nn.feedforward import FeedForward
from jaxformer.nn.mla import MultiHeadLatentAttention
from jaxformer.nn.moe import MoEFeedForward
from jaxformer.nn.moe_stats import record
from jaxformer.nn.norms import make_norm
from jaxformer.nn.params import normal_param
from jaxformer.nn.positional import (
    LearnedPositions,
    ShawRelativeBias,
    T5RelativeBias,
    alibi_bias,
    alibi_slopes,
    sinusoidal_encoding,
)
from jaxformer.parallel.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def dtypes(cfg: ModelConfig) -> tuple[jnp.dtype, jnp.dtype]:
    """-> (compute dtype, parameter dtype)."""
    return DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]


def model_norm(cfg: ModelConfig) -> nnx.Module:
    """The norm ``cfg`` names, over d_model."""
    return make_norm(cfg.norm, cfg.d_model, eps=cfg.norm_eps, use_bias=cfg.use_bias,
                     param_dtype=dtypes(cfg)[1])


def final_norm(cfg: ModelConfig) -> nnx.Module | None:
    """The norm after a stack's last block, or None when ``cfg.final_norm`` is off."""
    return model_norm(cfg) if cfg.final_norm else None


def token_table(cfg: ModelConfig, rngs: nnx.Rngs) -> Embedding:
    """The token embedding table [V, D] (also the tied un-embedding)."""
    dtype, pdtype = dtypes(cfg)
    return Embedding(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, dtype=dtype,
                     param_dtype=pdtype, rngs=rngs)


def split_rng(rng: jax.Array | None, n: int) -> list[jax.Array | None]:
    """n independent keys from ``rng`` (or n Nones: no dropout)."""
    return [None] * n if rng is None else list(jax.random.split(rng, n))


@dataclasses.dataclass
class AttentionInputs:
    """Everything an attention layer needs besides its input: positions for RoPE, masks and
    the additive bias, shared by every layer of a stack (computed once per forward pass)."""

    q_positions: jnp.ndarray | None = None  # [B, T]
    k_positions: jnp.ndarray | None = None  # [B, S]
    mask: jnp.ndarray | None = None  # [B|1, 1, T, S] bool
    bias: jnp.ndarray | None = None  # [B|1, N, T, S] float32
    is_causal: bool = False
    segment_ids: jnp.ndarray | None = None  # [B, T] (self-attention packing)
    window: int | None = None

    def kwargs(self) -> dict:
        return dict(q_positions=self.q_positions, k_positions=self.k_positions, mask=self.mask,
                    bias=self.bias, is_causal=self.is_causal, segment_ids=self.segment_ids,
                    window=self.window)


class InputEmbedding(nnx.Module):
    """Token embeddings (+ absolute positions, + token types) -> the first residual stream.

    The token table itself belongs to the model (an encoder-decoder shares one between its
    stacks); this module holds the rest: ``positions`` (learned positions), ``token_types``
    (BERT segments) and ``norm`` (BERT's embedding norm).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtypes(cfg)
        self.cfg = cfg
        self.positions = (LearnedPositions(cfg.max_len, cfg.d_model, init_std=cfg.init_std,
                                           dtype=dtype, param_dtype=pdtype, rngs=rngs)
                          if cfg.pos_encoding == "learned" else None)
        self.token_types = (Embedding(cfg.type_vocab_size, cfg.d_model, init_std=cfg.init_std,
                                      dtype=dtype, param_dtype=pdtype, rngs=rngs)
                            if cfg.type_vocab_size else None)
        self.norm = model_norm(cfg) if cfg.embed_norm else None

    def __call__(self, embed: Embedding, tokens: jnp.ndarray, positions: jnp.ndarray,
                 token_types: jnp.ndarray | None = None,
                 dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """tokens, positions, token_types: [B, T] int -> [B, T, D] in the compute dtype."""
        return self.add(self.lookup(embed, tokens), positions, token_types, dropout_rng)

    def lookup(self, embed: Embedding, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens [B, T] int -> their vectors [B, T, D] before positions (scaled by sqrt(D)
        with ``model.embed_scale``)."""
        x = embed(tokens)
        if self.cfg.embed_scale:
            x = x * jnp.asarray(math.sqrt(self.cfg.d_model), x.dtype)
        return x

    def add(self, x: jnp.ndarray, positions: jnp.ndarray,
            token_types: jnp.ndarray | None = None,
            dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """What follows the input vectors, whatever made them (token lookup, or an image's
        patch embeddings): + absolute positions, + token types, the embedding norm, dropout.
        x: [B, T, D]; positions, token_types: [B, T] int -> [B, T, D] in x's dtype."""
        cfg = self.cfg
        if self.positions is not None:
            x = x + self.positions(positions)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + sinusoidal_encoding(positions, cfg.d_model, cfg.sinusoidal_base).astype(x.dtype)
        if self.token_types is not None:
            types = jnp.zeros_like(positions) if token_types is None else token_types
            x = x + self.token_types(types)
        if self.norm is not None:
            x = self.norm(x)
        return dropout(x, cfg.dropout, dropout_rng)


class RelativePositionBias(nnx.Module):
    """The additive attention bias of ALiBi, T5 buckets or Shaw offsets, computed once per
    stack and shared by its layers (T5 shares it; ALiBi has no parameters). Param: ``table``
    ([buckets, N] for T5, [2 * max_distance + 1, N] for Shaw); none for ALiBi."""

    def __init__(self, cfg: ModelConfig, *, bidirectional: bool, rngs: nnx.Rngs):
        kind, n = cfg.pos_encoding, cfg.n_heads
        self.kind = kind
        _, pdtype = dtypes(cfg)
        if kind == "t5_relative":
            self.module = T5RelativeBias(n, num_buckets=cfg.relative_buckets,
                                         max_distance=cfg.relative_max_distance,
                                         bidirectional=bidirectional, init_std=cfg.init_std,
                                         param_dtype=pdtype, rngs=rngs)
        elif kind == "shaw":
            self.module = ShawRelativeBias(n, max_distance=cfg.relative_max_distance,
                                           init_std=cfg.init_std, param_dtype=pdtype, rngs=rngs)
        else:
            self.module = None
            # ALiBi keeps only the head count: its slopes are a constant of N, computed in
            # __call__. An array attribute would be module state without logical axes (not a
            # Param), which the sharding of the abstract train state cannot place.
            self.n_heads = n

    def __call__(self, q_positions: jnp.ndarray, k_positions: jnp.ndarray) -> jnp.ndarray | None:
        """[B, T], [B, S] int -> [B, N, T, S] float32, or None for other encodings."""
        if self.module is not None:
            return self.module(q_positions, k_positions)
        if self.kind == "alibi":
            return alibi_bias(jnp.asarray(alibi_slopes(self.n_heads)), q_positions, k_positions)
        return None


def has_relative_bias(cfg: ModelConfig) -> bool:
    return cfg.pos_encoding in ("alibi", "t5_relative", "shaw")


def residual_out_std(cfg: ModelConfig) -> float:
    """GPT-2's init: projections into the residual stream start smaller, by 1/sqrt(2 * layers)."""
    n_layers = cfg.n_layers
    if cfg.arch == "encoder_decoder":
        n_layers += cfg.n_decoder_layers or cfg.n_layers
    return cfg.init_std / math.sqrt(2 * n_layers)


def make_attention(cfg: ModelConfig, *, rngs: nnx.Rngs,
                   cross: bool = False) -> Attention | MultiHeadLatentAttention | AFT:
    """The attention module ``cfg.attention_type`` names: multi-head (with the kernel
    ``cfg.attention``, or an efficient family's kernel), MLA, LSH or AFT."""
    dtype, pdtype = dtypes(cfg)
    if cfg.attention_type == "mla":  # self-attention only (validate: decoder arch)
        return MultiHeadLatentAttention(
            cfg.d_model, cfg.n_heads, kv_lora_rank=cfg.kv_lora_rank,
            q_lora_rank=cfg.q_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
            qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim,
            rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps, init_std=cfg.init_std,
            out_std=residual_out_std(cfg), implementation=cfg.attention,
            scale=cfg.attention_scale or None, dropout=cfg.attention_dropout, dtype=dtype,
            param_dtype=pdtype, rngs=rngs)
    family = "mha" if cross else cfg.attention_type  # cross-attention stays dense
    if family in AFT_FAMILIES:
        return AFT(cfg.d_model, variant=aft_variant(family), max_len=cfg.max_len,
                   window=cfg.sliding_window, use_bias=cfg.use_bias, init_std=cfg.init_std,
                   out_std=residual_out_std(cfg), dtype=dtype, param_dtype=pdtype, rngs=rngs)
    use_rope = cfg.pos_encoding == "rope" and not cross
    kwargs = dict(n_kv_heads=cfg.kv_heads, head_dim=cfg.head_size, use_bias=cfg.use_bias,
                  init_std=cfg.init_std, out_std=residual_out_std(cfg),
                  rope=Rope(cfg.rope_theta, cfg.rope_fraction) if use_rope else None,
                  scale=cfg.attention_scale or None, dropout=cfg.attention_dropout,
                  dtype=dtype, param_dtype=pdtype, rngs=rngs)
    if family == "lsh":
        return LSHAttention(cfg.d_model, cfg.n_heads, n_hashes=cfg.lsh_hashes,
                            n_buckets=cfg.lsh_buckets, chunk=cfg.attention_block, **kwargs)
    if family in KERNEL_FAMILIES:
        kernel = FamilyKernel(family, block=cfg.attention_block, sparse_window=cfg.sparse_window,
                              n_global=cfg.sparse_global, n_random=cfg.sparse_random,
                              features=cfg.random_features, head_dim=cfg.head_size)
        return Attention(cfg.d_model, cfg.n_heads, implementation=kernel, **kwargs)
    return Attention(cfg.d_model, cfg.n_heads, implementation=cfg.attention, **kwargs)


class TransformerBlock(nnx.Module):
    """Self-attention, optional cross-attention, feed-forward; each a residual branch with
    its norm before (pre-LN: x + f(norm(x))) or after (post-LN: norm(x + f(x))).

    Params: ``attn_norm``, ``attn``, [``cross_norm``, ``cross_attn``], ``mlp_norm``, ``mlp``.
    """

    def __init__(self, cfg: ModelConfig, *, cross_attention: bool = False, moe: bool = False,
                 rngs: nnx.Rngs):
        dtype, pdtype = dtypes(cfg)
        self.cfg = cfg
        self.moe = moe

        def norm():
            return model_norm(cfg)

        self.attn_norm = norm()
        self.attn = make_attention(cfg, rngs=rngs)
        if cross_attention:
            self.cross_norm = norm()
            self.cross_attn = make_attention(cfg, rngs=rngs, cross=True)
        else:
            self.cross_norm = self.cross_attn = None
        self.mlp_norm = norm()
        if moe:
            self.mlp = MoEFeedForward(
                cfg.d_model, cfg.moe_d_ff or cfg.ff_width, n_experts=cfg.n_experts,
                top_k=cfg.experts_top_k, capacity_factor=cfg.capacity_factor,
                n_shared_experts=cfg.n_shared_experts, group_size=cfg.moe_group_size,
                activation=cfg.activation,
                init_std=cfg.init_std, out_std=residual_out_std(cfg), dtype=dtype,
                param_dtype=pdtype, rngs=rngs)
        else:
            self.mlp = FeedForward(cfg.d_model, cfg.ff_width, activation=cfg.activation,
                                   use_bias=cfg.use_bias, init_std=cfg.init_std,
                                   out_std=residual_out_std(cfg), dtype=dtype,
                                   param_dtype=pdtype, rngs=rngs)

    def reversible_step(self, x1: jnp.ndarray, x2: jnp.ndarray, inputs: AttentionInputs, *,
                        cache: LayerCache | None = None, cache_index: jnp.ndarray | None = None,
                        dropout_rng: jax.Array | None = None
                        ) -> tuple[jnp.ndarray, jnp.ndarray, LayerCache | None]:
        """The block as a reversible layer (``model.reversible``, pre-LN, no cross-attention):
        Y1 = X1 + Attention(norm(X2)), Y2 = X2 + FeedForward(norm(Y1)). x1, x2: [B, T, D]
        -> (y1, y2, updated self-attention cache). The same keys as ``__call__`` draw the
        dropout masks. The training forward runs these two branches through
        ``layer_stack.apply_reversible`` (a custom_vjp); decoding runs this method."""
        rngs = split_rng(dropout_rng, 5)
        f, new_cache = attention_branch(self.cfg, self.attn_norm, self.attn, x2, inputs,
                                        cache=cache, cache_index=cache_index, rngs=rngs)
        y1 = x1 + f
        return y1, x2 + feed_forward_branch(self.cfg, self.mlp_norm, self.mlp, y1, rngs), new_cache

    def _residual(self, x: jnp.ndarray, norm: nnx.Module, branch, rng: jax.Array | None):
        if self.cfg.norm_position == "pre":
            return x + dropout(branch(norm(x)), self.cfg.dropout, rng)
        return norm(x + dropout(branch(x), self.cfg.dropout, rng))

    def __call__(self, x: jnp.ndarray, inputs: AttentionInputs, *,
                 context: jnp.ndarray | None = None, cross_inputs: AttentionInputs | None = None,
                 cache: LayerCache | None = None, cache_index: jnp.ndarray | None = None,
                 cross_kv: LayerCache | None = None,
                 dropout_rng: jax.Array | None = None) -> tuple[jnp.ndarray, LayerCache | None]:
        """x: [B, T, D]; context: [B, S, D] encoder output for cross-attention; cross_kv: its
        keys and values from ``cross_attn.context_kv`` (then ``context`` is not used).
        -> ([B, T, D], updated self-attention cache)."""
        rngs = split_rng(dropout_rng, 5)
        new_cache = None

        def self_attn(h):
            nonlocal new_cache
            y, new_cache = self.attn(h, cache=cache, cache_index=cache_index,
                                     dropout_rng=rngs[0], **inputs.kwargs())
            return y

        x = self._residual(x, self.attn_norm, self_attn, rngs[1])
        if self.cross_attn is not None:
            ci = cross_inputs or AttentionInputs()

            def cross_attn(h):
                return self.cross_attn(h, context=context, context_kv=cross_kv,
                                       dropout_rng=rngs[2], **ci.kwargs())[0]

            x = self._residual(x, self.cross_norm, cross_attn, rngs[3])
        x = self._residual(x, self.mlp_norm, partial(self._feed_forward, inputs=inputs), rngs[4])
        return x, new_cache

    def _feed_forward(self, h: jnp.ndarray, inputs: AttentionInputs) -> jnp.ndarray:
        if not self.moe:
            return self.mlp(h, chunks=self.cfg.ff_chunks)
        # Padding (segment id 0) takes no expert capacity and does not count in router stats.
        mask = None if inputs.segment_ids is None else inputs.segment_ids > 0
        y, stats = self.mlp(h, mask)
        record(self, "moe_stats", stats)
        return y


def attention_branch(cfg: ModelConfig, norm: nnx.Module, attn: nnx.Module, h: jnp.ndarray,
                     inputs: AttentionInputs, *, cache: LayerCache | None = None,
                     cache_index: jnp.ndarray | None = None,
                     rngs: list[jax.Array | None]) -> tuple[jnp.ndarray, LayerCache | None]:
    """A pre-LN block's self-attention branch, dropout(attn(norm(h))), without the residual:
    h [B, T, D], rngs the block's five keys (``split_rng``) -> ([B, T, D], updated cache)."""
    y, new_cache = attn(norm(h), cache=cache, cache_index=cache_index, dropout_rng=rngs[0],
                        **inputs.kwargs())
    return dropout(y, cfg.dropout, rngs[1]), new_cache


def feed_forward_branch(cfg: ModelConfig, norm: nnx.Module, mlp: FeedForward, h: jnp.ndarray,
                        rngs: list[jax.Array | None]) -> jnp.ndarray:
    """A pre-LN block's dense feed-forward branch, dropout(mlp(norm(h))), in
    ``cfg.ff_chunks`` slices of the length: h [B, T, D] -> [B, T, D]."""
    return dropout(mlp(norm(h), chunks=cfg.ff_chunks), cfg.dropout, rngs[4])


def is_moe_layer(cfg: ModelConfig, i: int) -> bool:
    """Whether block ``i`` (0-based) has a mixture-of-experts feed-forward: every
    ``moe_every``-th block, counting from the last of each group (1: all)."""
    return cfg.n_experts > 0 and (i + 1) % cfg.moe_every == 0


class Unembedding(nnx.Module):
    """Final hidden states -> vocabulary logits: with the token table when tied, else with its
    own ``lm_head`` [D, V] (embed, vocab)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtypes(cfg)
        self.cfg = cfg
        self.dtype = dtype
        self.lm_head = (None if cfg.tie_embeddings else
                        normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"),
                                     cfg.init_std, pdtype))

    def __call__(self, x: jnp.ndarray, embed: Embedding) -> jnp.ndarray:
        """x: [B, T, D], embed: the token table (used when tied) -> logits [B, T, V] float32."""
        if self.lm_head is None:
            if self.cfg.scale_tied_logits:
                x = x * jnp.asarray(self.cfg.d_model ** -0.5, x.dtype)
            return constrain(embed.attend(x), ("batch", "length", "act_vocab"))
        b, t, d = x.shape
        logits = x.astype(self.dtype).reshape(b * t, d) @ self.lm_head[...].astype(self.dtype)
        return constrain(logits.reshape(b, t, -1).astype(jnp.float32),
                         ("batch", "length", "act_vocab"))
