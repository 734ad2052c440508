"""Encoder-decoder Transformer: the 2017 Transformer (Vaswani et al.) and T5 v1.0 / v1.1 (Raffel
et al.), from one config (see ``presets``).

Letters: B batch, S source (encoder) length, T target (decoder) length, D model width,
V vocabulary, C decode-cache length.

Segment ids (0 = padding) keep packed or padded examples apart everywhere: encoder
self-attention sees equal ids, decoder self-attention is causal within equal ids, and
cross-attention lets a decoder token see only the encoder tokens of its own segment id.

With ``cfg.audio_mels > 0`` the encoder reads audio (Whisper, Radford et al. 2022):
``models.audio.AudioFrontEnd`` replaces the encoder's token inputs, ``encode_audio`` gives the
memory and ``audio_logits`` the teacher-forced logits; decoding (``decode``) is unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.audio import AudioFrontEnd
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
from jaxformer.nn.attention import LayerCache, cache_length, decode_mask
from jaxformer.nn.masks import padding_mask, segment_mask


def _arange_positions(tokens: jnp.ndarray) -> jnp.ndarray:
    b, t = tokens.shape
    return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))


class EncoderDecoderLM(nnx.Module):
    """(source ids, target ids) -> next-target-token logits.

    Params: ``embed`` (the one token table of both stacks, and of the head when tied),
    ``enc_inputs`` / ``dec_inputs`` (learned positions, ...), ``enc_rel_bias`` /
    ``dec_rel_bias`` (T5 buckets etc.; each shared by all layers of its stack),
    ``encoder/{i}``, ``enc_norm``, ``decoder/{i}`` (with ``cross_attn``), ``dec_norm``,
    ``unembed`` (``lm_head`` when untied). An audio encoder (``cfg.audio_mels > 0``) has
    ``audio`` (``AudioFrontEnd``) instead of ``enc_inputs``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg

        self.embed = token_table(cfg, rngs)
        self.audio = AudioFrontEnd(cfg, rngs=rngs) if cfg.audio_mels > 0 else None
        self.enc_inputs = InputEmbedding(cfg, rngs=rngs) if self.audio is None else None
        self.dec_inputs = InputEmbedding(cfg, rngs=rngs)
        self.enc_rel_bias = RelativePositionBias(cfg, bidirectional=True, rngs=rngs)
        self.dec_rel_bias = RelativePositionBias(cfg, bidirectional=False, rngs=rngs)
        self.encoder = make_blocks(cfg, cfg.n_layers, lambda i, r: TransformerBlock(
            cfg, moe=is_moe_layer(cfg, i), rngs=r), rngs)
        self.enc_norm = final_norm(cfg)
        n_dec = cfg.n_decoder_layers or cfg.n_layers
        self.decoder = make_blocks(cfg, n_dec, lambda i, r: TransformerBlock(
            cfg, cross_attention=True, moe=is_moe_layer(cfg, i), rngs=r), rngs)
        self.dec_norm = final_norm(cfg)
        self.unembed = Unembedding(cfg, rngs=rngs)

    def __call__(self, enc_tokens: jnp.ndarray, dec_tokens: jnp.ndarray,
                 enc_segment_ids: jnp.ndarray | None = None,
                 dec_segment_ids: jnp.ndarray | None = None,
                 enc_positions: jnp.ndarray | None = None,
                 dec_positions: jnp.ndarray | None = None, *,
                 dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """Training / scoring forward pass (teacher forcing).

        enc_tokens, enc_segment_ids, enc_positions: [B, S] int; dec_*: [B, T] int (segment ids
        None: one example per row, no padding; positions None: 0, 1, 2, ...); dropout_rng: a key
        to train with dropout (None: deterministic) -> logits [B, T, V] float32.
        """
        enc_rng, dec_rng = split_rng(dropout_rng, 2)
        if enc_segment_ids is None:
            enc_segment_ids = jnp.ones_like(enc_tokens)
        if dec_segment_ids is None:
            dec_segment_ids = jnp.ones_like(dec_tokens)
        memory = self.encode(enc_tokens, enc_segment_ids, enc_positions, dropout_rng=enc_rng)
        return self._teacher_forced(memory, enc_segment_ids, dec_tokens, dec_segment_ids,
                                    dec_positions, dec_rng)

    def audio_logits(self, audio: jnp.ndarray, audio_mask: jnp.ndarray, dec_tokens: jnp.ndarray,
                     dec_segment_ids: jnp.ndarray | None = None,
                     dec_positions: jnp.ndarray | None = None, *,
                     dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """The forward pass of an audio encoder (teacher forcing): audio [B, N] float,
        audio_mask [B, T] (``models.audio.frame_mask``), dec_*: [B, T_dec] int as ``__call__``
        -> logits [B, T_dec, V] float32."""
        enc_rng, dec_rng = split_rng(dropout_rng, 2)
        if dec_segment_ids is None:
            dec_segment_ids = jnp.ones_like(dec_tokens)
        memory, enc_segment_ids = self.encode_audio(audio, audio_mask, dropout_rng=enc_rng)
        return self._teacher_forced(memory, enc_segment_ids, dec_tokens, dec_segment_ids,
                                    dec_positions, dec_rng)

    def _teacher_forced(self, memory: jnp.ndarray, enc_segment_ids: jnp.ndarray,
                        dec_tokens: jnp.ndarray, dec_segment_ids: jnp.ndarray,
                        dec_positions: jnp.ndarray | None,
                        dec_rng: jax.Array | None) -> jnp.ndarray:
        """The decoder over memory [B, S, D] -> logits [B, T, V] float32."""
        if dec_positions is None:
            dec_positions = _arange_positions(dec_tokens)
        inputs = AttentionInputs(q_positions=dec_positions,
                                 bias=self.dec_rel_bias(dec_positions, dec_positions),
                                 is_causal=True, segment_ids=dec_segment_ids,
                                 window=self.cfg.sliding_window or None)
        cross = AttentionInputs(mask=segment_mask(dec_segment_ids, enc_segment_ids))
        rngs = split_rng(dec_rng, (self.cfg.n_decoder_layers or self.cfg.n_layers) + 1)
        x = self.dec_inputs(self.embed, dec_tokens, dec_positions, dropout_rng=rngs[-1])
        x = apply_blocks(self, self.decoder, self.cfg, x, rngs[:-1],
                         lambda block, h, rng: block(h, inputs, context=memory,
                                                     cross_inputs=cross, dropout_rng=rng)[0])
        return self._logits(x)

    def encode(self, enc_tokens: jnp.ndarray, enc_segment_ids: jnp.ndarray | None = None,
               enc_positions: jnp.ndarray | None = None, *,
               dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """[B, S] int (segment ids None: no padding; positions None: arange) -> memory
        [B, S, D] in the compute dtype (after the final encoder norm, if any)."""
        if self.enc_inputs is None:
            raise ValueError(f"this encoder reads audio (model.audio_mels={self.cfg.audio_mels}"
                             "); call encode_audio()/audio_logits()")
        if enc_segment_ids is None:
            enc_segment_ids = jnp.ones_like(enc_tokens)
        if enc_positions is None:
            enc_positions = _arange_positions(enc_tokens)
        rngs = split_rng(dropout_rng, self.cfg.n_layers + 1)
        x = self.enc_inputs(self.embed, enc_tokens, enc_positions, dropout_rng=rngs[-1])
        return self._encoder_stack(x, enc_segment_ids, enc_positions, rngs[:-1])

    def encode_audio(self, audio: jnp.ndarray, audio_mask: jnp.ndarray, *,
                     dropout_rng: jax.Array | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """audio [B, N] float, audio_mask [B, T] -> (memory [B, S, D] in the compute dtype,
        encoder segment ids [B, S]: 1 on the clip's frames, 0 on padding), S = (T + 1) // 2."""
        if self.audio is None:
            raise ValueError("encode_audio() needs an audio encoder (model.audio_mels > 0)")
        rngs = split_rng(dropout_rng, self.cfg.n_layers + 1)
        x, segment_ids = self.audio(audio, audio_mask, dropout_rng=rngs[-1])
        positions = _arange_positions(segment_ids)
        return self._encoder_stack(x, segment_ids, positions, rngs[:-1]), segment_ids

    def _encoder_stack(self, x: jnp.ndarray, segment_ids: jnp.ndarray, positions: jnp.ndarray,
                       rngs: list[jax.Array | None]) -> jnp.ndarray:
        """The encoder blocks and final norm over input vectors x [B, S, D]."""
        inputs = AttentionInputs(q_positions=positions,
                                 bias=self.enc_rel_bias(positions, positions),
                                 segment_ids=segment_ids)
        x = apply_blocks(self, self.encoder, self.cfg, x, rngs,
                         lambda block, h, rng: block(h, inputs, dropout_rng=rng)[0])
        return x if self.enc_norm is None else self.enc_norm(x)

    def init_cache(self, batch: int, length: int) -> list[LayerCache]:
        """Empty decoder self-attention cache for ``length`` target positions."""
        cfg = self.cfg
        shape = (batch, cfg.kv_heads, length, cfg.head_size)  # heads first (LayerCache)
        dtype, _ = dtypes(cfg)
        return [LayerCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))
                for _ in range(len(self.decoder))]

    def cross_cache(self, memory: jnp.ndarray) -> list[LayerCache]:
        """Every decoder layer's cross-attention keys and values of ``memory`` [B, S, D]
        (from ``encode``), computed once per source for ``decode``."""
        return [block.cross_attn.context_kv(memory) for block in self.decoder]

    def decode(self, dec_tokens: jnp.ndarray, memory: jnp.ndarray | None,
               enc_segment_ids: jnp.ndarray | None, cache: list[LayerCache],
               cache_index: jnp.ndarray, *, cross_kv: list[LayerCache] | None = None
               ) -> tuple[jnp.ndarray, list[LayerCache]]:
        """Incremental decoder pass, one unpadded target per row.

        dec_tokens: [B, T] int at target positions cache_index .. cache_index + T - 1;
        memory: [B, S, D] from ``encode``; enc_segment_ids: [B, S] (nonzero = real source token;
        None: all real); cross_kv: ``cross_cache(memory)``, so that the cross-attention keys and
        values are not projected again at every step (then ``memory`` may be None).
        -> (logits [B, T, V] float32, new cache).
        """
        b, t = dec_tokens.shape
        c = cache_length(cache[0])
        positions = jnp.broadcast_to(cache_index + jnp.arange(t), (b, t))
        key_positions = jnp.broadcast_to(jnp.arange(c), (b, c))
        inputs = AttentionInputs(
            q_positions=positions, bias=self.dec_rel_bias(positions, key_positions),
            mask=decode_mask(b, t, c, cache_index, window=self.cfg.sliding_window or None))
        src_len = memory.shape[1] if cross_kv is None else cache_length(cross_kv[0])
        enc_valid = (jnp.ones((b, src_len), bool) if enc_segment_ids is None
                     else enc_segment_ids != 0)
        cross = AttentionInputs(mask=padding_mask(jnp.ones((b, t), bool), enc_valid))
        x = self.dec_inputs(self.embed, dec_tokens, positions)
        new_cache = []
        for i, (block, layer_cache) in enumerate(zip(self.decoder, cache, strict=True)):
            x, layer_cache = block(x, inputs, context=memory, cross_inputs=cross,
                                   cache=layer_cache, cache_index=cache_index,
                                   cross_kv=None if cross_kv is None else cross_kv[i])
            new_cache.append(layer_cache)
        return self._logits(x), new_cache

    def _logits(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.dec_norm is not None:
            x = self.dec_norm(x)
        return self.unembed(x, self.embed)
