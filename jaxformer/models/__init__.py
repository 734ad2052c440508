"""Architectures assembled from ``jaxformer.nn`` blocks, chosen by ``model.arch``.

Calling conventions (all arrays [B, T] int unless said otherwise; logits float32):

    decoder          DecoderLM(tokens, positions, segment_ids) -> [B, T, V]
    encoder          EncoderModel(tokens, positions, segment_ids, token_types=None)
                       -> [B, T, V] masked-LM logits; .classify(...) -> [B, num_labels]
                     with token_labels > 0: (...) and .tag(...) -> [B, T, token_labels]
                     with patch_size > 0 (ViT): .classify_image(pixels [B, H, W, C] float)
                       -> [B, num_labels]
    encoder_decoder  EncoderDecoderLM(enc_tokens, dec_tokens, enc_segment_ids, dec_segment_ids,
                       enc_positions=None, dec_positions=None) -> [B, T_dec, V]
    image_prefix     ImagePrefixLM(pixels [B, H, W, C] float, tokens, segment_ids) -> [B, T, V]
                       (the image's projected patches a bidirectional prefix of a decoder)
    xlnet            XLNetLM(tokens, positions, segment_ids, order=[B, T] ranks) -> [B, T, V]
                       (two-stream permutation LM: row t predicts tokens[t])
"""

from __future__ import annotations

from flax import nnx

from jaxformer.config import ModelConfig
from jaxformer.models.decoder import DecoderLM
from jaxformer.models.encoder import EncoderModel
from jaxformer.models.encoder_decoder import EncoderDecoderLM
from jaxformer.models.image_prefix import ImagePrefixLM
from jaxformer.models.xlnet import XLNetLM

# model.arch -> the class that builds it.
ARCHITECTURES: dict[str, type[nnx.Module]] = {
    "decoder": DecoderLM, "encoder": EncoderModel, "encoder_decoder": EncoderDecoderLM,
    "image_prefix": ImagePrefixLM, "xlnet": XLNetLM}


def build_model(cfg: ModelConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The model ``cfg.arch`` names, freshly initialized from ``rngs``."""
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"unknown model.arch={cfg.arch!r}; available: "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[cfg.arch](cfg, rngs=rngs)


from jaxformer.models import lora as _lora  # noqa: E402,F401 - registers the lora.targets check

__all__ = ["ARCHITECTURES", "DecoderLM", "EncoderDecoderLM", "EncoderModel", "ImagePrefixLM",
           "XLNetLM", "build_model"]
