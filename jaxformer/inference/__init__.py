"""Inference: generation for every family (``generate``, ``families``), logits processors,
beam search, speculative decoding, the paged KV cache with continuous batching (``engine``),
prompt caches, quantized weights, the OpenAI-compatible server; docs/inference.md.

Objectives name the strategies they are decoded with (``Objective.sampling``,
``Objective.decode_metrics``); these tables map the names to the functions, each
``(cfg, graphdef, params, task)``.
"""

from collections.abc import Callable

from jaxformer.inference.captions import caption_exact_match
from jaxformer.inference.families import decodes
from jaxformer.inference.samples import continuation_samples
from jaxformer.inference.seq2seq import exact_match
from jaxformer.inference.speech import character_error_rate

# End-of-run samples: -> [(prompt, generated text)].
SAMPLERS: dict[str, Callable[..., list[tuple[str, str]]]] = {
    "continuation": continuation_samples}
# Evaluation metrics computed by decoding held-out data: -> a float (exact_match: higher is
# better; cer, the character error rate of speech transcripts: lower is better;
# caption_exact_match, held-out captions exactly right: higher is better).
DECODE_METRICS: dict[str, Callable[..., float]] = {"exact_match": exact_match,
                                                   "cer": character_error_rate,
                                                   "caption_exact_match": caption_exact_match}

__all__ = ["DECODE_METRICS", "SAMPLERS", "decodes"]
