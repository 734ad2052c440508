"""Architectures assembled from ``jaxformer.nn`` blocks."""

from jaxformer.models.decoder import DecoderLM

__all__ = ["DecoderLM"]
