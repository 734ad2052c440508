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
from jaxformer.models.layer_stack import apply_blocks, make_blocks
from jaxformer.nn.attention import LayerCache, decode_mask, decode_positions
from jaxformer.nn.masks import causal_mask, segment_mask
from jaxformer.nn.mla import MLACache


def prefix_mask(prefix: jnp.ndarray) -> jnp.ndarray:
    """Prefix-LM visibility per token: key s is visible to query t when s <= t, or when both
    are prefix tokens (and in the same document: the caller ands the segment mask).
    prefix: [B, T] int/bool -> [B, 1, T, T] bool; one row-prefix of length P gives the block
    matrix [[1, 0], [1, causal]] of ``masks.prefix_lm_mask``."""
    p = prefix.astype(bool)
    both = p[:, :, None] & p[:, None, :]  # [B, T, S]
    return causal_mask(prefix.shape[1]) | both[:, None]


class DecoderLM(nnx.Module):
    """Token ids -> next-token logits.

    Params: ``embed`` (token table), ``inputs`` (positions, ...), ``rel_bias`` (ALiBi / T5 /
    Shaw; shared by all layers), ``blocks/{i}``, ``final_norm``, ``unembed`` (``lm_head`` when
    untied).
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

    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: jnp.ndarray | None = None, *,
                 prefix: jnp.ndarray | None = None,
                 dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """Training / scoring forward pass.

        tokens, positions, segment_ids: [B, T] int (segment_ids None: one document per row;
        0 marks padding); prefix: [B, T] int/bool, for a prefix-LM: 1 marks the tokens of each
        document's prefix, which see each other both ways; the rest attend causally (None:
        causal everywhere);
        dropout_rng: a key to train with dropout (None: deterministic) -> logits [B, T, V] f32.
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
        x = self.inputs(self.embed, tokens, positions, dropout_rng=rngs[-1])
        x = apply_blocks(self, self.blocks, cfg, x, rngs[:-1],
                         lambda block, h, rng: block(h, inputs, dropout_rng=rng)[0])
        return self._logits(x)

    def init_cache(self, batch: int, length: int) -> list[LayerCache] | list[MLACache]:
        """Empty decode cache for ``length`` positions (at most model.max_len)."""
        cfg = self.cfg
        shape = (batch, length, cfg.kv_heads, cfg.head_size)
        dtype, _ = dtypes(cfg)
        if cfg.attention_type == "mla":  # the latent and the rope key only, nothing per head
            return [MLACache(latent=jnp.zeros((batch, length, cfg.kv_lora_rank), dtype),
                             k_rope=jnp.zeros((batch, length, cfg.qk_rope_head_dim), dtype))
                    for _ in range(cfg.n_layers)]
        return [LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
                for _ in range(cfg.n_layers)]

    def decode(self, tokens: jnp.ndarray, cache: list[LayerCache] | list[MLACache],
               cache_index: jnp.ndarray, *, offsets: jnp.ndarray | None = None,
               prefix_end: jnp.ndarray | int | None = None) -> tuple[jnp.ndarray, list]:
        """Incremental forward pass: tokens [B, T] int written at cache slots cache_index ..
        cache_index + T - 1 (a prompt when cache_index == 0, then one token at a time, or a few
        at once to verify a draft) -> (logits [B, T, V], new cache).

        offsets: [B] int, left-padding slots per row (None: none): a row's positions count from
        its first real slot and its padding is never attended to. prefix_end: slots below it
        attend to each other both ways, as a prefix-LM's prefix was trained (None: causal).
        """
        b, t = tokens.shape
        s = next(iter(cache[0].values())).shape[1]  # cache length (LayerCache or MLACache)
        positions = decode_positions(b, t, cache_index, offsets)
        key_positions = decode_positions(b, s, jnp.zeros((), jnp.int32), offsets)
        inputs = AttentionInputs(
            q_positions=positions, bias=self.rel_bias(positions, key_positions),
            mask=decode_mask(b, t, s, cache_index, window=self.cfg.sliding_window or None,
                             offsets=offsets, prefix_end=prefix_end))
        x = self.inputs(self.embed, tokens, positions)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block(x, inputs, cache=layer_cache, cache_index=cache_index)
            new_cache.append(layer_cache)
        return self._logits(x), new_cache

    def _logits(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.final_norm is not None:
            x = self.final_norm(x)
        return self.unembed(x, self.embed)
