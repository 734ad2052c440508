"""Model presets: the block choices that define each family, as ModelConfigs.

Every preset takes keyword overrides for the size (n_layers, d_model, ...) or anything else:
``presets.llama(n_layers=4, d_model=256, n_heads=8, n_kv_heads=2, vocab_size=4096)``.
The Hugging Face converters in ``jaxformer.hf`` produce the same layouts from config.json.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxformer.config import ModelConfig

# Each family's switches; sizes stay at ModelConfig's defaults unless overridden.
FAMILIES: dict[str, dict[str, Any]] = {
    # Radford et al. 2019: pre-LN, learned positions, GELU (tanh), biases, tied embeddings.
    "gpt2": dict(arch="decoder", pos_encoding="learned", norm="layernorm", norm_position="pre",
                 activation="gelu_tanh", use_bias=True, tie_embeddings=True),
    # Touvron et al. 2023: pre-RMSNorm, RoPE, SwiGLU, no biases, untied head; GQA by n_kv_heads.
    "llama": dict(arch="decoder", pos_encoding="rope", rope_theta=10000.0, norm="rmsnorm",
                  norm_eps=1e-6, norm_position="pre", activation="swiglu", use_bias=False,
                  tie_embeddings=False),
    # Jiang et al. 2023: Llama plus sliding-window attention.
    "mistral": dict(arch="decoder", pos_encoding="rope", rope_theta=10000.0, norm="rmsnorm",
                    norm_eps=1e-6, norm_position="pre", activation="swiglu", use_bias=False,
                    tie_embeddings=False, sliding_window=4096),
    # A decoder trained with a bidirectional prefix (the objective passes prefix_len).
    "prefix_lm": dict(arch="decoder", pos_encoding="rope", norm="rmsnorm", norm_eps=1e-6,
                      activation="swiglu", use_bias=False, tie_embeddings=False),
    # Devlin et al. 2019: post-LN, learned positions, token types, embedding LayerNorm, GELU.
    "bert": dict(arch="encoder", pos_encoding="learned", norm="layernorm", norm_eps=1e-12,
                 norm_position="post", final_norm=False, activation="gelu", use_bias=True,
                 tie_embeddings=True, embed_norm=True, type_vocab_size=2),
    # Dosovitskiy et al. 2021 (ViT): a pre-LN encoder over image patches (set patch_size,
    # image_size, image_channels, num_labels), learned positions, [CLS] pooling, exact GELU.
    "vit": dict(arch="encoder", pos_encoding="learned", norm="layernorm", norm_eps=1e-6,
                norm_position="pre", final_norm=True, activation="gelu", use_bias=True,
                embed_norm=False, type_vocab_size=0, pooling="first"),
    # PaLI / LLaVA-style image-prefix decoder (set patch_size, image_size, image_channels,
    # vision_layers): a pre-LN ViT tower (2-D sin-cos positions, no [CLS]) and an MLP projector
    # feeding a pre-LN decoder with learned positions, exact GELU, biases, tied embeddings.
    "image_prefix": dict(arch="image_prefix", pos_encoding="learned", norm="layernorm",
                         norm_eps=1e-6, norm_position="pre", final_norm=True, activation="gelu",
                         use_bias=True, tie_embeddings=True),
    # Radford et al. 2022 (Whisper): a pre-LN encoder-decoder whose encoder reads an 80-channel
    # log-Mel spectrogram through two convolutions (models/audio.py) with fixed sinusoidal
    # positions; learned decoder positions, exact GELU, biases, the token table tied to the head.
    "whisper": dict(arch="encoder_decoder", pos_encoding="learned", norm="layernorm",
                    norm_eps=1e-5, norm_position="pre", final_norm=True, activation="gelu",
                    use_bias=True, tie_embeddings=True, audio_mels=80),
    # Vaswani et al. 2017: post-LN, sinusoidal, ReLU, shared embeddings scaled by sqrt(d).
    "transformer_2017": dict(arch="encoder_decoder", pos_encoding="sinusoidal",
                             norm="layernorm", norm_position="post", final_norm=False,
                             activation="relu", use_bias=True, tie_embeddings=True,
                             embed_scale=True),
    # Raffel et al. 2020 (T5 v1.0): pre-RMSNorm, shared relative bias, ReLU, tied head whose
    # input is scaled by d^-0.5, unscaled attention scores.
    "t5_v1_0": dict(arch="encoder_decoder", pos_encoding="t5_relative", norm="rmsnorm",
                    norm_eps=1e-6, norm_position="pre", activation="relu", use_bias=False,
                    tie_embeddings=True, scale_tied_logits=True, attention_scale=1.0),
    # T5 v1.1: GeGLU (tanh GELU, as transformers' "gated-gelu") and an untied head.
    "t5_v1_1": dict(arch="encoder_decoder", pos_encoding="t5_relative", norm="rmsnorm",
                    norm_eps=1e-6, norm_position="pre", activation="geglu_tanh",
                    use_bias=False, tie_embeddings=False, attention_scale=1.0),
}


def preset(family: str, **overrides: Any) -> ModelConfig:
    """The ModelConfig of ``family`` (a key of FAMILIES) with ``overrides`` applied."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return dataclasses.replace(ModelConfig(), **{**FAMILIES[family], **overrides})


def gpt2(**overrides: Any) -> ModelConfig:
    return preset("gpt2", **overrides)


def llama(**overrides: Any) -> ModelConfig:
    return preset("llama", **overrides)


def mistral(**overrides: Any) -> ModelConfig:
    return preset("mistral", **overrides)


def prefix_lm(**overrides: Any) -> ModelConfig:
    return preset("prefix_lm", **overrides)


def bert(**overrides: Any) -> ModelConfig:
    return preset("bert", **overrides)


def vit(**overrides: Any) -> ModelConfig:
    return preset("vit", **overrides)


def image_prefix(**overrides: Any) -> ModelConfig:
    return preset("image_prefix", **overrides)


def whisper(**overrides: Any) -> ModelConfig:
    return preset("whisper", **overrides)


def transformer_2017(**overrides: Any) -> ModelConfig:
    return preset("transformer_2017", **overrides)


def t5_v1_0(**overrides: Any) -> ModelConfig:
    return preset("t5_v1_0", **overrides)


def t5_v1_1(**overrides: Any) -> ModelConfig:
    return preset("t5_v1_1", **overrides)
