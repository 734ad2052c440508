"""Special tokens objectives add to the tokenizer, after EOS (id 0) and PAD (id 1)
(``Objective.special_roles``), as a byte-level BPE names them; the other kinds of
``data.tokenizer`` name them their own way (``jaxformer.data.tokenizer_kinds``).

A causal LM needs none, so its tokenizer (and its numbers) do not change with the objectives
that exist; masked LM needs a mask token; span corruption needs one sentinel per noise span.
"""

from __future__ import annotations

from jaxformer.data.tokenizer_kinds import KINDS, MASK_ROLE, N_SENTINELS, SENTINELS_ROLE

__all__ = ["MASK", "MASK_ROLE", "N_SENTINELS", "SENTINELS_ROLE", "sentinel"]

MASK = KINDS["bpe"].mask  # "<|mask|>"


def sentinel(i: int) -> str:
    """The byte-level BPE token that stands for the i-th noise span of an example (T5's
    <extra_id_i>)."""
    return KINDS["bpe"].sentinel(i)
