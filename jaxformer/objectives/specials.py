"""Special tokens objectives add to the tokenizer, after EOS (id 0) and PAD (id 1)
(``Objective.special_tokens``).

A causal LM needs none, so its tokenizer (and its numbers) do not change with the objectives
that exist; masked LM needs a mask token; span corruption needs one sentinel per noise span.
"""

from __future__ import annotations

MASK = "<|mask|>"
# T5 reserves 100 sentinels for 512-token inputs; 64 cover ~1,000 input tokens at the default
# density 0.15 and mean span 3 (one span per 20 tokens). More spans are a config-time error.
N_SENTINELS = 64


def sentinel(i: int) -> str:
    """The token that stands for the i-th noise span of an example (T5's <extra_id_i>)."""
    return f"<|extra_{i}|>"
