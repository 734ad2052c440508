"""The Vision Transformer's front end (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"):
pixels -> patch vectors -> the first residual stream of the encoder (``models.encoder``), whose
blocks, pooler and classifier are the text encoder's own.

Letters: B batch, H/W image height/width, C channels, P patch side, G = H / P patches per side,
N = G * G patches, T tokens (N, + 1 with [CLS]), D model width.

Patch order and layout (``patchify``): patches are taken row by row (patch n sits at patch row
n // G, column n % G), and each is flattened with its own pixel rows outermost and the channels
innermost: entry (i * P + j) * C + c of patch n is pixel (P * (n // G) + i, P * (n % G) + j),
channel c. The linear map of these vectors is a convolution with kernel = stride = P (a
``lax.conv_general_dilated`` with an HWIO kernel of ``w.reshape(P, P, C, D)``; tested).
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.common import dtypes
from jaxformer.nn.params import constant_param, normal_param
from jaxformer.nn.positional import sinusoidal_2d_encoding


def patchify(pixels: jnp.ndarray, patch: int) -> jnp.ndarray:
    """pixels [B, H, W, C] -> non-overlapping patches [B, N, P * P * C] in the order of the
    module docstring (H and W multiples of P)."""
    b, h, w, c = pixels.shape
    if h % patch or w % patch:
        raise ValueError(f"patchify: a {h}x{w} image is not whole {patch}x{patch} patches")
    x = pixels.reshape(b, h // patch, patch, w // patch, patch, c)  # B, Gh, P, Gw, P, C
    x = x.transpose(0, 1, 3, 2, 4, 5)  # B, Gh, Gw, P (pixel row), P (pixel column), C
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


class PatchEmbedding(nnx.Module):
    """Images -> the encoder's input vectors [B, T, D]: each patch's pixels times ``w`` plus
    ``b``, + the 2-D sin-cos positions (``pos_encoding='sinusoidal_2d'``), after a learned
    [CLS] vector (``pooling='first'``). Other position kinds are the encoder's, over the token
    index (``InputEmbedding``; [CLS] at 0, patch n at n + 1).

    Params: ``w`` [P*P*C, D] (None, embed), ``b`` [D] (embed), ``cls`` [D] (embed) with
    ``pooling='first'``.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        dtype, pdtype = dtypes(cfg)
        self.dtype = dtype
        self.patch = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.channels = cfg.image_channels
        fan_in = cfg.patch_size ** 2 * cfg.image_channels
        # LeCun normal, as ViT's patch convolution: pixel patches are not token embeddings,
        # and an init_std of 0.02 would make them vanish beside the position vectors.
        self.w = normal_param(rngs, (fan_in, cfg.d_model), (None, "embed"), fan_in ** -0.5,
                              pdtype)
        self.b = constant_param((cfg.d_model,), ("embed",), 0.0, pdtype)
        # ViT starts [CLS] at zero; its position (learned, or 0 for sin-cos) tells it apart.
        self.cls = (constant_param((cfg.d_model,), ("embed",), 0.0, pdtype)
                    if cfg.pooling == "first" else None)
        self.sincos_base = (cfg.sinusoidal_base if cfg.pos_encoding == "sinusoidal_2d"
                            else None)

    def __call__(self, pixels: jnp.ndarray) -> jnp.ndarray:
        """pixels [B, H, W, C] float (H = W = image_size) -> [B, T, D] in the compute dtype."""
        b, h, w, c = pixels.shape
        side = self.grid * self.patch
        if (h, w, c) != (side, side, self.channels):
            raise ValueError(f"PatchEmbedding: expected images of {side}x{side}x{self.channels}"
                             f" (model.image_size, model.image_channels), got {h}x{w}x{c}")
        patches = patchify(pixels.astype(self.dtype), self.patch)  # [B, N, P*P*C]
        x = patches @ self.w[...].astype(self.dtype) + self.b[...].astype(self.dtype)
        if self.sincos_base is not None:
            table = sinusoidal_2d_encoding(self.grid, self.grid, x.shape[-1], self.sincos_base)
            x = x + jnp.asarray(table, x.dtype)
        if self.cls is not None:
            cls = jnp.broadcast_to(self.cls[...].astype(self.dtype), (b, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
        return x
