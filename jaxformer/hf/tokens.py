"""The special tokens of an exported model, where transformers looks for them.

A run's tokenizer (``jaxformer.data.tokenizer``) has the end-of-text token ``<|endoftext|>``
(id 0) and the padding token ``<|pad|>`` (id 1), then the objective's own (a mask token,
sentinels). An export writes their ids into ``config.json`` and ``generation_config.json`` in
the names of its family (each family module's ``special_token_ids``: GPT-2 and Llama also
begin documents with end-of-text, T5 starts decoding with the padding token, BERT has padding
only), so ``generate`` stops at the run's end of text and nothing falls back to a default id
outside the vocabulary (GPT-2's 50256, Llama's 1 and 2). It also writes the tokenizer:
``tokenizer.json`` as the run has it and a ``tokenizer_config.json`` naming the special tokens,
so ``AutoTokenizer.from_pretrained`` loads it.

Tokens are found by name, so a tokenizer that came with a converted Hugging Face model (GPT-2's
``<|endoftext|>`` is 50256) gives its own ids; a name the tokenizer lacks is left out.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from jaxformer.data.tokenizer import EOS, PAD
from jaxformer.objectives.specials import MASK, sentinel

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


def known(**ids: int | None) -> dict[str, int]:
    """The ids that are not None (a tokenizer may lack a token)."""
    return {name: i for name, i in ids.items() if i is not None}


def special_ids(family: types.ModuleType, tokenizer: Tokenizer) -> dict[str, int]:
    """The ``*_token_id`` entries of ``family``'s config for ``tokenizer``'s tokens."""
    return family.special_token_ids(eos=tokenizer.token_to_id(EOS),
                                    pad=tokenizer.token_to_id(PAD))


def generation_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The ``generation_config.json`` of a model: the token ids its config has."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return {k: hf_config[k] for k in keys if hf_config.get(k) is not None}


def tokenizer_config(tokenizer: Tokenizer, ids: dict[str, int], max_len: int
                     ) -> dict[str, Any]:
    """``tokenizer_config.json``: a fast tokenizer from ``tokenizer.json`` whose special tokens
    are the ones ``ids`` names (the begin token only where the family has one), plus the mask
    token and sentinels the tokenizer holds."""
    by_id = {i: tokenizer.id_to_token(i) for i in ids.values()}
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                           "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    for name in ("bos", "eos", "pad"):
        if f"{name}_token_id" in ids:
            out[f"{name}_token"] = by_id[ids[f"{name}_token_id"]]
    if tokenizer.token_to_id(MASK) is not None:
        out["mask_token"] = MASK
    sentinels = []
    while tokenizer.token_to_id(sentinel(len(sentinels))) is not None:
        sentinels.append(sentinel(len(sentinels)))
    if sentinels:
        out["extra_special_tokens"] = sentinels
    return out


def write_tokenizer(directory: Path, tokenizer: Tokenizer, ids: dict[str, int],
                    max_len: int) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    (directory / TOKENIZER_FILE).write_text(tokenizer.to_str())
    config = tokenizer_config(tokenizer, ids, max_len)
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_generation_config(directory: Path, hf_config: dict[str, Any]) -> None:
    (directory / GENERATION_CONFIG_FILE).write_text(
        json.dumps(generation_config(hf_config), indent=2, sort_keys=True) + "\n")
