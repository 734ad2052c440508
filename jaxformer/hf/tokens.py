"""The special tokens of an exported model, where transformers looks for them.

A run's tokenizer (``jaxformer.data.tokenizer``) has the end-of-text token ``<|endoftext|>``
(id 0) and the padding token ``<|pad|>`` (id 1), then the objective's own (a mask token,
sentinels); the other kinds of ``data.tokenizer`` name them their own way
(``jaxformer.data.tokenizer_kinds``: BERT's ``[SEP]``/``[PAD]``/``[MASK]``, T5's
``</s>``/``<pad>``/``<extra_id_N>``). An export writes their ids into ``config.json`` and
``generation_config.json`` in the names of its family (each family module's
``special_token_ids``: GPT-2 and Llama also begin documents with end-of-text, T5 starts
decoding with the padding token, BERT has padding only), so ``generate`` stops at the run's
end of text and nothing falls back to a default id outside the vocabulary (GPT-2's 50256,
Llama's 1 and 2). It also writes the tokenizer: ``tokenizer.json`` as the run has it and a
``tokenizer_config.json`` naming the special tokens, so ``AutoTokenizer.from_pretrained`` loads it.

Tokens are found by name, so a tokenizer that came with a converted Hugging Face model (GPT-2's
``<|endoftext|>`` is 50256) gives its own ids; a name the tokenizer lacks is left out. A run
converted from a Hugging Face model writes back the ids its ``special_tokens.json`` holds.

The other way (``convert --from-hf``), ``imported_special_tokens`` reads which ids a Hugging
Face directory's files name, with transformers' precedence: ``generation_config.json`` over
``config.json`` over the tokenizer's own config (``tokenizer_config.json``, then
``special_tokens_map.json``), whose token strings are resolved to ids through
``tokenizer.json``. No token string is assumed: GPT-2, Llama, BERT and T5 tokenizers all name
theirs.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from jaxformer.data.special_tokens import SpecialTokens
from jaxformer.data.tokenizer_kinds import SENTINELS_ROLE, kind_of
from jaxformer.hf.checkpoint_io import HFConversionError, read_hf_config

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def known(**ids: Any) -> dict[str, Any]:
    """The ids that are not None (a tokenizer may lack a token)."""
    return {name: i for name, i in ids.items() if i is not None}


def exported_ids(specials: SpecialTokens) -> dict[str, Any]:
    """The ``*_token_id`` entries of a converted model's special tokens, as it came (the end
    token a list when the model has several)."""
    eos = list(specials.eos_ids)
    return known(bos_token_id=specials.bos_id,
                 eos_token_id=None if not eos else eos[0] if len(eos) == 1 else eos,
                 pad_token_id=specials.pad_id, decoder_start_token_id=specials.decoder_start_id)


def special_ids(family: types.ModuleType, tokenizer: Tokenizer) -> dict[str, int]:
    """The ``*_token_id`` entries of ``family``'s config for ``tokenizer``'s tokens (named as
    its kind names them: ``jaxformer.data.tokenizer_kinds``)."""
    kind = kind_of(tokenizer)
    return family.special_token_ids(eos=tokenizer.token_to_id(kind.eos),
                                    pad=tokenizer.token_to_id(kind.pad))


def generation_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The ``generation_config.json`` of a model: the token ids its config has."""
    keys = ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
    return {k: hf_config[k] for k in keys if hf_config.get(k) is not None}


def tokenizer_config(tokenizer: Tokenizer, ids: dict[str, Any], max_len: int
                     ) -> dict[str, Any]:
    """``tokenizer_config.json``: a fast tokenizer from ``tokenizer.json`` whose special tokens
    are the ones ``ids`` names (the begin token only where the family has one; the first of a
    list of end tokens), plus the mask token and sentinels the tokenizer holds."""
    out: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast",
                           "model_max_length": max_len, "clean_up_tokenization_spaces": False}
    for name in ("bos", "eos", "pad"):
        token_id = ids.get(f"{name}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0]
        if token_id is not None:
            out[f"{name}_token"] = tokenizer.id_to_token(token_id)
    kind = kind_of(tokenizer)
    if kind.unk is not None and tokenizer.token_to_id(kind.unk) is not None:
        out["unk_token"] = kind.unk
    if tokenizer.token_to_id(kind.mask) is not None:
        out["mask_token"] = kind.mask
    sentinels = []
    while kind.supports(SENTINELS_ROLE) and tokenizer.token_to_id(
            kind.sentinel(len(sentinels))) is not None:
        sentinels.append(kind.sentinel(len(sentinels)))
    if sentinels:
        out["extra_special_tokens"] = sentinels
    return out


def write_tokenizer(directory: Path, tokenizer: Tokenizer, ids: dict[str, Any],
                    max_len: int) -> None:
    """``tokenizer.json`` and ``tokenizer_config.json`` into ``directory``."""
    (directory / TOKENIZER_FILE).write_text(tokenizer.to_str())
    config = tokenizer_config(tokenizer, ids, max_len)
    (directory / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def write_generation_config(directory: Path, hf_config: dict[str, Any]) -> None:
    (directory / GENERATION_CONFIG_FILE).write_text(
        json.dumps(generation_config(hf_config), indent=2, sort_keys=True) + "\n")


# --- import: the special tokens a Hugging Face directory names ------------------------------


def _optional_json(path: Path) -> dict[str, Any]:
    """A JSON object file of a Hugging Face directory ({} when absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:  # JSONDecodeError, or UnicodeDecodeError for binary garbage
        raise HFConversionError(f"{path} is not valid JSON: "
                                f"{' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, dict):
        raise HFConversionError(f"{path} holds a JSON {type(data).__name__}, not an object")
    return data


def _token_text(value: Any) -> str | None:
    """A special token as a tokenizer config stores it: a string, or an AddedToken object
    with its text under "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def tokenizer_token_strings(hf_dir: Path) -> dict[str, str | None]:
    """{"bos": ..., "eos": ..., "pad": ...}: the token strings the tokenizer's config names
    (None: it names none). ``tokenizer_config.json`` holds them; ``special_tokens_map.json``
    adds the ones it lacks, and wins for a config without ``added_tokens_decoder`` (the older
    layout, where transformers reads the map over the config)."""
    config = _optional_json(hf_dir / TOKENIZER_CONFIG_FILE)
    token_map = _optional_json(hf_dir / SPECIAL_TOKENS_MAP_FILE)
    map_wins = "added_tokens_decoder" not in config
    out = {}
    for name in ("bos", "eos", "pad"):
        key = f"{name}_token"
        first, second = (token_map, config) if map_wins else (config, token_map)
        source = first if key in first else second
        out[name] = _token_text(source.get(key))
    return out


def _adds_bos(tokenizer: Tokenizer, bos_id: int, tokenizer_config: dict[str, Any]) -> bool:
    """Whether the tokenizer puts ``bos_id`` before a text: what its post-processor does
    (transformers 5 loads that from tokenizer.json as it is); without one, the config's
    ``add_bos_token`` (transformers 4 rebuilt a Llama tokenizer's post-processor from it)."""
    if tokenizer.post_processor is None:
        return tokenizer_config.get("add_bos_token") is True
    probe = "a"  # any text: only what the post-processor adds around it matters
    plain = tokenizer.encode(probe, add_special_tokens=False).ids
    full = tokenizer.encode(probe, add_special_tokens=True).ids
    return len(full) > len(plain) and full[0] == bos_id and full[1:len(plain) + 1] == plain


def imported_special_tokens(hf_dir: Path | str, tokenizer: Tokenizer | None, vocab_size: int,
                            encoder_decoder: bool) -> tuple[SpecialTokens, Any]:
    """-> (the special tokens of a Hugging Face model directory, its chat template or None).

    Each of begin, end, padding and (encoder-decoder) decoder start comes from the first that
    names it: ``generation_config.json``, ``config.json`` (``*_token_id``; the end may be a
    list: generation stops at any), then the tokenizer's config (a token string, resolved to
    its id in ``tokenizer``). An encoder-decoder that names no decoder start starts from
    padding (transformers' T5 convention). ``add_bos`` is whether the tokenizer puts the begin
    token before a text (Llama, Mistral: yes; GPT-2: no). An id outside the model's
    ``vocab_size`` rows is an HFConversionError naming the file and key.
    """
    hf_dir = Path(hf_dir)
    sources = [(GENERATION_CONFIG_FILE, _optional_json(hf_dir / GENERATION_CONFIG_FILE)),
               ("config.json", read_hf_config(hf_dir))]
    strings = tokenizer_token_strings(hf_dir)
    tokenizer_config = _optional_json(hf_dir / TOKENIZER_CONFIG_FILE)

    def check(value: Any, where: str) -> list[int]:
        values = value if isinstance(value, list) else [value]
        for i in values:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size:
                raise HFConversionError(f"{hf_dir / where} names {i!r}, not a token id of the "
                                        f"model's {vocab_size}-token vocabulary")
        return values

    def pick(name: str) -> list[int]:
        key = f"{name}_token_id"
        for file, data in sources:
            if data.get(key) is not None:
                return check(data[key], f"{file}: {key}")
        text = strings.get(name)
        if text is None or tokenizer is None:
            return []
        token_id = tokenizer.token_to_id(text)
        if token_id is None:  # named but not in the vocabulary: transformers would add it
            return []
        return check(token_id, f"{TOKENIZER_CONFIG_FILE}: {name}_token {text!r}")

    bos, pad = pick("bos"), pick("pad")
    eos = tuple(dict.fromkeys(pick("eos")))  # the order kept, repeats dropped
    bos_id = bos[0] if bos else None
    pad_id = pad[0] if pad else None
    start = pick("decoder_start") if encoder_decoder else []
    decoder_start = start[0] if start else (pad_id if encoder_decoder else None)
    add_bos = (tokenizer is not None and bos_id is not None
               and _adds_bos(tokenizer, bos_id, tokenizer_config))
    chat_file = hf_dir / CHAT_TEMPLATE_FILE
    chat = (chat_file.read_text(encoding="utf-8") if chat_file.is_file()
            else tokenizer_config.get("chat_template"))
    return SpecialTokens(bos_id=bos_id, eos_ids=eos, pad_id=pad_id,
                         decoder_start_id=decoder_start, add_bos=add_bos), chat
