"""Decoder-only Transformer language model: GPT-2, Llama, Mistral and prefix-LM layouts, all
from one config (see ``presets``).

Letters: B batch, T length, D model width, V vocabulary, S cache length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.common import (
    AttentionInputs,
    InputEmbedding,
    RelativePositionBias,
    TransformerBlock,
    Unembedding,
    dtypes,
    final_norm,
    is_moe_layer,
    split_rng,
    token_table,
)
from jaxformer.models.layer_stack import REMAT_POLICIES, apply_blocks, make_blocks
from jaxformer.nn.attention import (
    LayerCache,
    LinearCache,
    cache_length,
    decode_mask,
    decode_positions,
)
from jaxformer.nn.masks import causal_mask, segment_mask
from jaxformer.nn.mla import MLACache
from jaxformer.nn.norms import RMSNorm
from jaxformer.nn.params import normal_param
from jaxformer.parallel.sharding import constrain


def prefix_mask(prefix: jnp.ndarray) -> jnp.ndarray:
    """Prefix-LM visibility per token: key s is visible to query t when s <= t, or when both
    are prefix tokens (and in the same document: the caller ands the segment mask).
    prefix: [B, T] int/bool -> [B, 1, T, T] bool; one row-prefix of length P gives the block
    matrix [[1, 0], [1, causal]] of ``masks.prefix_lm_mask``."""
    p = prefix.astype(bool)
    both = p[:, :, None] & p[:, None, :]  # [B, T, S]
    return causal_mask(prefix.shape[1]) | both[:, None]


class MTPModule(nnx.Module):
    """One sequential multi-token-prediction depth (DeepSeek-V3 MTP; Gloeckle et al. 2024):
    the previous depth's hidden state h [B, T, D] at position i and the embedding e of token
    t_{i+k} -> ``block(W [RMSNorm(h); RMSNorm(e)])`` [B, T, D], which the shared final norm and
    un-embedding turn into logits for t_{i+k+1}.

    Params: ``hidden_norm``, ``embed_norm`` (RMSNorm scales [D]), ``proj`` [2D, D]
    (mlp, embed), ``block`` (one Transformer block of the model's own kind).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtypes(cfg)
        self.dtype = dtype
        self.hidden_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype)
        self.embed_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, param_dtype=pdtype)
        self.proj = normal_param(rngs, (2 * cfg.d_model, cfg.d_model), ("mlp", "embed"),
                                 cfg.init_std, pdtype)
        # The block kind of the model's last layer (an MoE model's MTP block is MoE too).
        self.block = TransformerBlock(cfg, moe=is_moe_layer(cfg, cfg.n_layers - 1), rngs=rngs)

    def __call__(self, h: jnp.ndarray, e: jnp.ndarray, inputs: AttentionInputs, *,
                 cache: LayerCache | MLACache | None = None,
                 cache_index: jnp.ndarray | None = None,
                 dropout_rng: jax.Array | None = None) -> tuple[jnp.ndarray, LayerCache | None]:
        """h, e: [B, T, D] -> (this depth's hidden state [B, T, D], updated block cache)."""
        z = jnp.concatenate([self.hidden_norm(h).astype(self.dtype),
                             self.embed_norm(e).astype(self.dtype)], axis=-1)
        z = constrain(z @ self.proj[...].astype(self.dtype), ("batch", "length", "act_embed"))
        return self.block(z, inputs, cache=cache, cache_index=cache_index,
                          dropout_rng=dropout_rng)


def shift_tokens(tokens: jnp.ndarray, k: int) -> jnp.ndarray:
    """tokens [B, T] -> [B, T] with column i holding tokens[:, i + k] (0 past the end)."""
    return jnp.pad(tokens[:, k:], ((0, 0), (0, min(k, tokens.shape[1]))))


class DecoderLM(nnx.Module):
    """Token ids -> next-token logits.

    Params: ``embed`` (token table), ``inputs`` (positions, ...), ``rel_bias`` (ALiBi / T5 /
    Shaw; shared by all layers), ``blocks/{i}``, ``final_norm``, ``unembed`` (``lm_head`` when
    untied), and with ``model.mtp_heads = n > 0`` ``mtp/{0 .. n-1}`` (``MTPModule``: depth k
    predicts the token k + 1 places ahead, sharing the embedding, final norm and un-embedding).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = token_table(cfg, rngs)
        self.inputs = InputEmbedding(cfg, rngs=rngs)
        self.rel_bias = RelativePositionBias(cfg, bidirectional=False, rngs=rngs)
        self.blocks = make_blocks(cfg, cfg.n_layers, lambda i, r: TransformerBlock(
            cfg, moe=is_moe_layer(cfg, i), rngs=r), rngs)
        self.final_norm = final_norm(cfg)
        self.unembed = Unembedding(cfg, rngs=rngs)
        # Created last: the main model's initial weights do not depend on mtp_heads, and
        # mtp_heads = 0 adds no parameter.
        self.mtp = (nnx.List([MTPModule(cfg, rngs=rngs) for _ in range(cfg.mtp_heads)])
                    if cfg.mtp_heads else None)

    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: jnp.ndarray | None = None, *,
                 prefix: jnp.ndarray | None = None,
                 dropout_rng: jax.Array | None = None,
                 return_mtp: bool = False, vectors: jnp.ndarray | None = None
                 ) -> jnp.ndarray | tuple[jnp.ndarray, jnp.ndarray]:
        """Training / scoring forward pass.

        tokens, positions, segment_ids: [B, T] int (segment_ids None: one document per row;
        0 marks padding); prefix: [B, T] int/bool, for a prefix-LM: 1 marks the tokens of each
        document's prefix, which see each other both ways; the rest attend causally (None:
        causal everywhere);
        dropout_rng: a key to train with dropout (None: deterministic) -> logits [B, T, V] f32.

        return_mtp (a model with ``mtp_heads`` n > 0): -> (logits, mtp_logits [n, B, T, V]),
        where mtp_logits[k - 1, :, i] predicts token i + k + 1 from depth k, which sees the
        main model's hidden state at i and the input tokens i + 1 .. i + k (0 past the end: a
        loss must weight those positions 0, as it must targets in another document).

        vectors: [B, T, D] input vectors in place of the token embeddings (what an image-prefix
        model feeds: its projected image patches, then ``embed_tokens`` of its text); the
        positions and the rest of the stack are the same.
        """
        cfg = self.cfg
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        rngs = split_rng(dropout_rng, cfg.n_layers + 1)
        inputs = AttentionInputs(q_positions=positions,
                                 bias=self.rel_bias(positions, positions),
                                 window=cfg.sliding_window or None)
        if prefix is None:
            inputs.is_causal, inputs.segment_ids = True, segment_ids
        else:
            inputs.mask = prefix_mask(prefix) & segment_mask(segment_ids)
        if vectors is None:
            x = self.inputs(self.embed, tokens, positions, dropout_rng=rngs[-1])
        else:
            x = self.inputs.add(vectors, positions, dropout_rng=rngs[-1])
        x = apply_blocks(self, self.blocks, cfg, x, rngs[:-1],
                         lambda block, h, rng: block(h, inputs, dropout_rng=rng)[0], inputs)
        if not return_mtp:
            return self._logits(x)
        if self.mtp is None:
            raise ValueError("return_mtp needs a model with model.mtp_heads > 0")

        def depth(module: MTPModule, h: jnp.ndarray, e: jnp.ndarray, rng: jax.Array | None):
            return constrain(module(h, e, inputs, dropout_rng=rng)[0],
                             ("batch", "length", "act_embed"))

        if cfg.remat != "none":
            depth = nnx.remat(depth, policy=REMAT_POLICIES[cfg.remat])
        mtp_logits, h = [], x
        for k, module in enumerate(self.mtp, start=1):
            # Its own dropout keys, so that the main model's do not depend on mtp_heads.
            rng = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1_000 + k)
            h = depth(module, h, self.embed(shift_tokens(tokens, k)), rng)
            mtp_logits.append(self._logits(h))
        return self._logits(x), jnp.stack(mtp_logits)

    def embed_tokens(self, tokens: jnp.ndarray) -> jnp.ndarray:
        """tokens [B, T] int -> their input vectors [B, T, D] before positions (the lookup,
        scaled by sqrt(D) with ``model.embed_scale``): what ``vectors`` continues."""
        return self.inputs.lookup(self.embed, tokens)

    def init_cache(self, batch: int, length: int) -> list[LayerCache] | list[MLACache]:
        """Empty decode cache for ``length`` positions (at most model.max_len)."""
        return self._empty_cache(batch, length, self.cfg.n_layers)

    def init_mtp_cache(self, batch: int, length: int) -> list[LayerCache] | list[MLACache]:
        """Empty decode cache of the MTP modules' blocks (one per depth), as ``init_cache``."""
        return self._empty_cache(batch, length, self.cfg.mtp_heads)

    def _empty_cache(self, batch: int, length: int, n: int) -> list[LayerCache] | list[MLACache]:
        cfg = self.cfg
        shape = (batch, cfg.kv_heads, length, cfg.head_size)  # heads first (LayerCache)
        dtype, _ = dtypes(cfg)
        if cfg.attention_type == "linear":  # running sums, a fixed size whatever the length
            h = cfg.head_size
            return [LinearCache(slots=jnp.zeros((batch, length), bool),
                                s=jnp.zeros((batch, cfg.kv_heads, h, h), jnp.float32),
                                z=jnp.zeros((batch, cfg.kv_heads, h), jnp.float32))
                    for _ in range(n)]
        if cfg.attention_type == "mla":  # the latent and the rope key only, nothing per head
            return [MLACache(latent=jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
                             k_rope=jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype))
                    for _ in range(n)]
        return [LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
                for _ in range(n)]

    def decode(self, tokens: jnp.ndarray, cache: list[LayerCache] | list[MLACache],
               cache_index: jnp.ndarray, *, offsets: jnp.ndarray | None = None,
               prefix_end: jnp.ndarray | int | None = None, return_hidden: bool = False,
               vectors: jnp.ndarray | None = None, last_only: bool = False
               ) -> tuple[jnp.ndarray, list] | tuple[jnp.ndarray, list, jnp.ndarray]:
        """Incremental forward pass: tokens [B, T] int written at cache slots cache_index ..
        cache_index + T - 1 (a prompt when cache_index == 0, then one token at a time, or a few
        at once to verify a draft) -> (logits [B, T, V], new cache).

        offsets: [B] int, left-padding slots per row (None: none): a row's positions count from
        its first real slot and its padding is never attended to. prefix_end: slots below it
        attend to each other both ways, as a prefix-LM's prefix was trained (None: causal).
        return_hidden: also return the last block's output [B, T, D] (before the final norm:
        what depth 1 of the MTP modules takes, see ``mtp_decode``). vectors: [B, T, D] input
        vectors in place of the tokens' embeddings (as ``__call__``; tokens then give only the
        shape). last_only: logits [B, 1, V] of the last position only, what a prefill needs (XLA
        does not move a later ``[:, -1]`` before the output layer: over a 16 x 128 prompt of
        gpt_tiny's shape that matmul was a third of the prefill's time: 86 ms with it, 58 without).
        """
        b, t = tokens.shape
        s = cache_length(cache[0])
        positions, inputs = self._decode_inputs(b, t, s, cache_index, offsets, prefix_end)
        x = (self.inputs(self.embed, tokens, positions) if vectors is None
             else self.inputs.add(vectors, positions))
        new_cache = []
        x1 = x2 = x  # model.reversible: the two halves of the residual stream
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            if self.cfg.reversible:  # apply_reversible's math, as a plain loop
                x1, x2, layer_cache = block.reversible_step(x1, x2, inputs, cache=layer_cache,
                                                            cache_index=cache_index)
            else:
                x, layer_cache = block(x, inputs, cache=layer_cache, cache_index=cache_index)
            new_cache.append(layer_cache)
        if self.cfg.reversible:
            x = 0.5 * (x1 + x2)
        logits = self._logits(x[:, -1:] if last_only else x)
        if return_hidden:
            return logits, new_cache, x
        return logits, new_cache

    def mtp_decode(self, depth: int, hidden: jnp.ndarray, tokens: jnp.ndarray,
                   cache: LayerCache | MLACache, cache_index: jnp.ndarray, *,
                   offsets: jnp.ndarray | None = None
                   ) -> tuple[jnp.ndarray, jnp.ndarray, LayerCache | MLACache]:
        """MTP depth ``depth`` (1 .. mtp_heads) over T positions at cache slots cache_index ..
        cache_index + T - 1, the incremental form of ``__call__(..., return_mtp=True)``:
        hidden [B, T, D] the previous depth's hidden states there (depth 1: ``decode(...,
        return_hidden=True)``'s), tokens [B, T] the tokens ``depth`` places after each
        position, cache this depth's (``init_mtp_cache(...)[depth - 1]``)
        -> (logits [B, T, V] for the tokens depth + 1 places after each position, this
        depth's hidden states [B, T, D] for the next depth, the updated cache)."""
        b, t = tokens.shape
        s = cache_length(cache)
        _, inputs = self._decode_inputs(b, t, s, cache_index, offsets, None)
        h, cache = self.mtp[depth - 1](hidden, self.embed(tokens), inputs, cache=cache,
                                       cache_index=cache_index)
        return self._logits(h), h, cache

    def _decode_inputs(self, b: int, t: int, s: int, cache_index: jnp.ndarray,
                       offsets: jnp.ndarray | None, prefix_end: jnp.ndarray | int | None
                       ) -> tuple[jnp.ndarray, AttentionInputs]:
        """-> (query positions [B, T], the attention inputs of T queries over S cache slots)."""
        positions = decode_positions(b, t, cache_index, offsets)
        key_positions = decode_positions(b, s, jnp.zeros((), jnp.int32), offsets)
        inputs = AttentionInputs(
            q_positions=positions, bias=self.rel_bias(positions, key_positions),
            mask=decode_mask(b, t, s, cache_index, window=self.cfg.sliding_window or None,
                             offsets=offsets, prefix_end=prefix_end))
        return positions, inputs

    def _logits(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.unembed(x, self.embed)
