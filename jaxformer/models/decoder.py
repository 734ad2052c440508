"""Decoder-only Transformer language model (GPT-2 layout: pre-LN blocks, tied un-embedding).

Letters: B batch, T length, D model width, V vocabulary, S cache length.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.nn.attention import LayerCache, MultiHeadAttention, causal_segment_mask, decode_mask
from jaxformer.nn.embedding import Embedding
from jaxformer.nn.feedforward import GeluMlp
from jaxformer.nn.norms import LayerNorm
from jaxformer.nn.positional import LearnedPositions, sinusoidal_encoding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class DecoderBlock(nnx.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        # GPT-2: projections into the residual stream start smaller, by 1/sqrt(2 * layers).
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        self.ln_attn = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, param_dtype=pdtype)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, init_std=cfg.init_std,
                                       out_std=out_std, implementation=cfg.attention,
                                       dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.ln_mlp = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, param_dtype=pdtype)
        self.mlp = GeluMlp(cfg.d_model, cfg.d_ff or 4 * cfg.d_model, init_std=cfg.init_std,
                           out_std=out_std, dtype=dtype, param_dtype=pdtype, rngs=rngs)

    def __call__(self, x: jnp.ndarray, mask: jnp.ndarray, cache: LayerCache | None = None,
                 cache_index: jnp.ndarray | None = None) -> tuple[jnp.ndarray, LayerCache | None]:
        h, cache = self.attn(self.ln_attn(x), mask, cache, cache_index)
        x = x + h
        x = x + self.mlp(self.ln_mlp(x))
        return x, cache


class DecoderLM(nnx.Module):
    """Token ids -> next-token logits."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, pdtype = DTYPES[cfg.compute_dtype], DTYPES[cfg.param_dtype]
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, init_std=cfg.init_std, dtype=dtype,
                               param_dtype=pdtype, rngs=rngs)
        self.positions = (LearnedPositions(cfg.max_len, cfg.d_model, init_std=cfg.init_std,
                                           dtype=dtype, param_dtype=pdtype, rngs=rngs)
                          if cfg.pos_encoding == "learned" else None)
        self.blocks = nnx.List([DecoderBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.d_model, eps=cfg.layer_norm_eps, param_dtype=pdtype)

    def __call__(self, tokens: jnp.ndarray, positions: jnp.ndarray,
                 segment_ids: jnp.ndarray | None = None) -> jnp.ndarray:
        """Training / scoring forward pass.

        tokens, positions, segment_ids: [B, T] int (segment_ids None: one document per row;
        0 marks padding) -> logits [B, T, V] float32.
        """
        if segment_ids is None:
            segment_ids = jnp.ones_like(tokens)
        mask = causal_segment_mask(segment_ids)
        x = self._embed(tokens, positions)
        for block in self.blocks:
            x, _ = block(x, mask)
        return self.embed.attend(self.final_norm(x))

    def init_cache(self, batch: int, length: int) -> list[LayerCache]:
        """Empty decode cache for ``length`` positions (at most model.max_len)."""
        cfg = self.cfg
        shape = (batch, length, cfg.n_heads, cfg.d_model // cfg.n_heads)
        dtype = DTYPES[cfg.compute_dtype]
        return [LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
                for _ in range(cfg.n_layers)]

    def decode(self, tokens: jnp.ndarray, cache: list[LayerCache],
               cache_index: jnp.ndarray) -> tuple[jnp.ndarray, list[LayerCache]]:
        """Incremental forward pass for one unpadded sequence per row.

        tokens: [B, T] int, placed at positions cache_index .. cache_index + T - 1 (a prompt
        when cache_index == 0, then one token at a time) -> (logits [B, T, V], new cache).
        """
        b, t = tokens.shape
        positions = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
        mask = decode_mask(b, t, cache[0]["k"].shape[1], cache_index)
        x = self._embed(tokens, positions)
        new_cache = []
        for block, layer_cache in zip(self.blocks, cache, strict=True):
            x, layer_cache = block(x, mask, layer_cache, cache_index)
            new_cache.append(layer_cache)
        return self.embed.attend(self.final_norm(x)), new_cache

    def _embed(self, tokens: jnp.ndarray, positions: jnp.ndarray) -> jnp.ndarray:
        x = self.embed(tokens)
        if self.positions is not None:
            return x + self.positions(positions)
        pe = sinusoidal_encoding(positions, self.cfg.d_model, self.cfg.sinusoidal_base)
        return x + pe.astype(x.dtype)
