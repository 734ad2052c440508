"""An image-prefix multimodal decoder (PaLI, Chen et al. 2023; LLaVA, Liu et al. 2023): a Vision
Transformer reads the image, a learned projector maps its patch states into the decoder's input
space, and those vectors are the prefix of a decoder-only language model, which attends to
them both ways and to the text causally (the prefix-LM mask of ``decoder.prefix_mask``).

Letters: B batch, N image patches ((image_size / patch_size)^2), L text length, D model width,
V vocabulary.

- ``vision``: the ViT of ``models.encoder`` (``vision_config``: ``model.vision_layers``
  blocks of the model's own width and kind, 2-D sin-cos positions, no [CLS] and no head),
  whose final states [B, N, D] are the image features.
- ``projector``: LLaVA-1.5's two-layer MLP, Dense D->D, GELU, Dense D->D.
- ``decoder``: ``DecoderLM`` over the sequence [projected patches; text], positions 0..N+L-1,
  the patches a bidirectional prefix. The loss reads the text's logits only.

With ``model.freeze_vision`` the features are a constant to the gradient (``stop_gradient``)
and the optimizer leaves the ``vision`` parameters as they are (``train.optimizer``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.common import dtypes
from jaxformer.models.decoder import DecoderLM
from jaxformer.models.encoder import Dense, EncoderModel


def vision_config(cfg: ModelConfig) -> ModelConfig:
    """The vision tower's config: the model's own blocks, ``vision_layers`` of them, reading
    whole images as patches with 2-D sin-cos positions and no [CLS] token or head."""
    return dataclasses.replace(cfg, arch="encoder", n_layers=cfg.vision_layers,
                               pos_encoding="sinusoidal_2d", pooling="mean", num_labels=0,
                               mtp_heads=0)


def image_patches(cfg: ModelConfig) -> int:
    """N: the prefix length an image takes."""
    return (cfg.image_size // cfg.patch_size) ** 2


class Projector(nnx.Module):
    """Image features [B, N, D] -> decoder input vectors [B, N, D] (Dense, GELU, Dense).

    Params: ``fc1``, ``fc2`` (each ``w`` [D, D], ``b`` [D])."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtypes(cfg)
        kw = dict(init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype, rngs=rngs)
        self.fc1 = Dense(cfg.d_model, cfg.d_model, ("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.d_model, cfg.d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class ImagePrefixLM(nnx.Module):
    """Images and caption tokens -> next-token logits over the caption.

    Params: ``vision`` (``EncoderModel`` of ``vision_config``), ``projector``, ``decoder``
    (``DecoderLM``).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = EncoderModel(vision_config(cfg), rngs=rngs)
        self.projector = Projector(cfg, rngs=rngs)
        self.decoder = DecoderLM(cfg, rngs=rngs)

    def image_prefix(self, pixels: jnp.ndarray, *,
                     dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """pixels [B, H, W, C] float -> the decoder's prefix vectors [B, N, D]."""
        features = self.vision.encode_image(pixels, dropout_rng=dropout_rng)
        if self.cfg.freeze_vision:
            features = jax.lax.stop_gradient(features)
        return self.projector(features)

    def sequence(self, pixels: jnp.ndarray, tokens: jnp.ndarray,
                 segment_ids: jnp.ndarray | None, dropout_rng: jax.Array | None
                 ) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        """-> the decoder's inputs over [image; text]: (vectors [B, N+L, D], positions,
        segment ids and prefix marks [B, N+L])."""
        b, length = tokens.shape
        rng_vision = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1)
        image = self.image_prefix(pixels, dropout_rng=rng_vision)
        n = image.shape[1]
        text = self.decoder.embed_tokens(tokens)
        vectors = jnp.concatenate([image.astype(text.dtype), text], axis=1)
        positions = jnp.broadcast_to(jnp.arange(n + length, dtype=jnp.int32), (b, n + length))
        text_segments = jnp.ones_like(tokens) if segment_ids is None else segment_ids
        segments = jnp.concatenate([jnp.ones((b, n), jnp.int32),
                                    text_segments.astype(jnp.int32)], axis=1)
        prefix = jnp.concatenate([jnp.ones((b, n), jnp.int32),
                                  jnp.zeros((b, length), jnp.int32)], axis=1)
        return vectors, positions, segments, prefix

    def __call__(self, pixels: jnp.ndarray, tokens: jnp.ndarray,
                 segment_ids: jnp.ndarray | None = None, *,
                 dropout_rng: jax.Array | None = None) -> jnp.ndarray:
        """pixels [B, H, W, C] float, tokens [B, L] int (BOS, then the caption), segment_ids
        [B, L] (1 on the text, 0 padding; None: all text) -> logits [B, L, V] float32, position
        i predicting token i + 1 of the text."""
        vectors, positions, segments, prefix = self.sequence(pixels, tokens, segment_ids,
                                                             dropout_rng)
        # The token ids under the image positions feed nothing (vectors replace them).
        ids = jnp.pad(tokens, ((0, 0), (vectors.shape[1] - tokens.shape[1], 0)))
        logits = self.decoder(ids, positions, segments, prefix=prefix,
                              dropout_rng=dropout_rng, vectors=vectors)
        return logits[:, -tokens.shape[1]:]

    def init_cache(self, batch: int, length: int) -> list:
        """The decoder's empty cache for ``length`` slots (the image's N, then the text)."""
        return self.decoder.init_cache(batch, length)

    def prefill(self, pixels: jnp.ndarray, tokens: jnp.ndarray, cache: list
                ) -> tuple[jnp.ndarray, list]:
        """Decoding's first call: the image prefix (slots 0..N-1, attending both ways) and the
        first text tokens [B, T] (slots N..N+T-1) -> (their logits [B, T, V], the cache)."""
        image = self.image_prefix(pixels)
        n = image.shape[1]
        text = self.decoder.embed_tokens(tokens)
        vectors = jnp.concatenate([image.astype(text.dtype), text], axis=1)
        ids = jnp.pad(tokens, ((0, 0), (n, 0)))
        logits, cache = self.decoder.decode(ids, cache, jnp.zeros((), jnp.int32),
                                            prefix_end=n, vectors=vectors)
        return logits[:, n:], cache

    def decode(self, tokens: jnp.ndarray, cache: list, cache_index: jnp.ndarray
               ) -> tuple[jnp.ndarray, list]:
        """Text tokens [B, T] at cache slots cache_index.. -> (logits [B, T, V], cache)."""
        return self.decoder.decode(tokens, cache, cache_index)
