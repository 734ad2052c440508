"""The special tokens a run uses with its tokenizer: begin, end, padding, decoder start.

A tokenizer jaxformer trained has its own names for them (``jaxformer.data.tokenizer``: EOS
``<|endoftext|>`` ends each document and starts the next, PAD ``<|pad|>`` pads and starts an
encoder-decoder's decoder; the other kinds of ``data.tokenizer`` have their own,
``jaxformer.data.tokenizer_kinds``), so they are found by name. A tokenizer that came with a Hugging
Face model (``jaxformer convert --from-hf``) has other tokens at other ids (GPT-2's
``<|endoftext|>`` is 50256, Llama's ``<s>``/``</s>``, T5's ``<pad>``/``</s>``, BERT has no end
token at all), so the converter writes their ids into ``special_tokens.json`` next to
``tokenizer.json`` and everything that reads that tokenizer takes them from there; no Hugging
Face token string is assumed anywhere.

``special_tokens.json``::

    {"bos_id": 1, "eos_ids": [2], "pad_id": null, "decoder_start_id": null, "add_bos": true,
     "chat_template": null}

``runs.specials`` reads and writes it for a run dir; this module holds the format, so the data
pipeline (which packs documents with the end token) can read it too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from jaxformer.data.errors import DataError
from jaxformer.data.tokenizer import load_tokenizer
from jaxformer.data.tokenizer_kinds import kind_of

SPECIAL_TOKENS_FILE = "special_tokens.json"


@dataclasses.dataclass(frozen=True)
class SpecialTokens:
    """The ids of a run's special tokens (None: the tokenizer has no such token)."""

    bos_id: int | None  # prepended to a prompt when add_bos; starts an empty prompt
    eos_ids: tuple[int, ...]  # generation stops at any of these; the first ends documents
    pad_id: int | None
    decoder_start_id: int | None  # encoder-decoder only (T5: the pad id)
    add_bos: bool  # whether prompts (and training documents) get bos_id first

    @property
    def eos_id(self) -> int | None:
        """The end token documents end with (the first of ``eos_ids``); None without one."""
        return self.eos_ids[0] if self.eos_ids else None

    def ids(self) -> set[int]:
        """Every id named here (to leave out of decoded text)."""
        named = (self.bos_id, self.pad_id, self.decoder_start_id, *self.eos_ids)
        return {i for i in named if i is not None}

    def to_json(self) -> dict[str, Any]:
        return {"bos_id": self.bos_id, "eos_ids": list(self.eos_ids), "pad_id": self.pad_id,
                "decoder_start_id": self.decoder_start_id, "add_bos": self.add_bos}

    @classmethod
    def from_json(cls, data: Any, where: str = SPECIAL_TOKENS_FILE) -> SpecialTokens:
        """The inverse of ``to_json``; a DataError naming ``where`` for anything else."""
        if not isinstance(data, dict):
            raise DataError(f"{where} is not a JSON object")

        def optional_id(key: str) -> int | None:
            value = data.get(key)
            if value is not None and not _is_id(value):
                raise DataError(f"{where}: {key} must be a token id (an int >= 0) or null, "
                                f"got {value!r}")
            return value

        eos = data.get("eos_ids", [])
        if not isinstance(eos, list) or not all(_is_id(i) for i in eos):
            raise DataError(f"{where}: eos_ids must be a list of token ids, got {eos!r}")
        add_bos = data.get("add_bos", False)
        if not isinstance(add_bos, bool):
            raise DataError(f"{where}: add_bos must be true or false, got {add_bos!r}")
        specials = cls(bos_id=optional_id("bos_id"), eos_ids=tuple(eos),
                       pad_id=optional_id("pad_id"),
                       decoder_start_id=optional_id("decoder_start_id"), add_bos=add_bos)
        if specials.add_bos and specials.bos_id is None:
            raise DataError(f"{where}: add_bos is true but bos_id is null")
        return specials

    def check_vocab(self, vocab_size: int, where: str) -> None:
        """A DataError when an id is outside ``[0, vocab_size)`` (an embedding row the model
        does not have)."""
        for name, value in self.to_json().items():
            for i in value if isinstance(value, list) else [value]:
                if _is_id(i) and i >= vocab_size:
                    raise DataError(f"{where}: {name} {i} is outside the vocabulary of "
                                    f"{vocab_size} tokens")


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def of_jaxformer_tokenizer(tokenizer: Any, encoder_decoder: bool = False) -> SpecialTokens:
    """The special tokens of a tokenizer jaxformer trained (or anything with ``token_to_id``
    and jaxformer's names, such as the synthetic tasks' ``SymbolTokenizer``), as the code uses
    them: EOS ends documents and starts the next one (so it also starts an empty prompt, but
    is not put before a prompt's text), PAD pads and starts an encoder-decoder's decoder
    (span corruption, seq2seq). The names are those of the tokenizer's kind
    (``jaxformer.data.tokenizer_kinds``: ``<|endoftext|>`` and ``<|pad|>`` for byte-level BPE,
    ``[SEP]`` and ``[PAD]`` for WordPiece, ``</s>`` and ``<pad>`` for the others)."""
    kind = kind_of(tokenizer)
    eos, pad = tokenizer.token_to_id(kind.eos), tokenizer.token_to_id(kind.pad)
    return SpecialTokens(bos_id=eos, eos_ids=() if eos is None else (eos,), pad_id=pad,
                         decoder_start_id=pad if encoder_decoder else None, add_bos=False)


def read_file(directory: Path) -> tuple[SpecialTokens, Any] | None:
    """-> (the special tokens, the chat template or None) of ``directory``'s
    ``special_tokens.json``; None when there is no such file."""
    path = Path(directory) / SPECIAL_TOKENS_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # JSON and Unicode decode errors are ValueErrors
        raise DataError(f"{path} is not readable: {str(e).strip()[:200]}") from e
    return SpecialTokens.from_json(data, str(path)), data.get("chat_template")


def write_file(directory: Path, specials: SpecialTokens, chat_template: Any = None) -> None:
    """Writes ``directory/special_tokens.json`` (atomically: temp file, then rename)."""
    path = Path(directory) / SPECIAL_TOKENS_FILE
    data = {**specials.to_json(), "chat_template": chat_template}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def for_tokenizer(tokenizer: Tokenizer, tokenizer_path: Path | None,
                  encoder_decoder: bool = False) -> SpecialTokens:
    """The special tokens of ``tokenizer``, loaded from ``tokenizer_path``: those in the
    ``special_tokens.json`` beside it (a converted Hugging Face tokenizer), else jaxformer's
    by name."""
    found = read_file(Path(tokenizer_path).parent) if tokenizer_path is not None else None
    if found is not None:
        return found[0]
    return of_jaxformer_tokenizer(tokenizer, encoder_decoder)


def load_with_specials(tokenizer_path: Path, encoder_decoder: bool = False
                       ) -> tuple[Tokenizer, SpecialTokens]:
    """-> (the tokenizer in ``tokenizer_path``, its special tokens): a converted Hugging Face
    tokenizer with the ``special_tokens.json`` beside it, or a jaxformer one (which must have
    EOS)."""
    found = read_file(Path(tokenizer_path).parent)
    tokenizer = load_tokenizer(tokenizer_path, require_eos=found is None)
    if found is not None:
        return tokenizer, found[0]
    return tokenizer, of_jaxformer_tokenizer(tokenizer, encoder_decoder)
