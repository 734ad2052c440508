"""The tokenizers of the literature a run can train (``data.tokenizer``), with their own
special tokens and word boundaries.

Every kind is trained with Hugging Face ``tokenizers`` on the run's training documents and
saved as the run's ``tokenizer.json``; the file alone says which kind it is (``kind_of``: the
model type and its tokens), so everything that reads a run's tokenizer (objectives, sampling,
attention maps, export) finds the special tokens by the kind's own names (``KINDS``)::

    kind       what                              end            padding  mask      sentinels
    bpe        GPT-2 byte-level BPE              <|endoftext|>  <|pad|>  <|mask|>  <|extra_N|>
    wordpiece  BERT WordPiece, ``##`` pieces     [SEP]          [PAD]    [MASK]    (none)
    unigram    SentencePiece Unigram (T5), ``▁`` </s>           <pad>    <mask>    <extra_id_N>
    char       one token per character           </s>           <pad>    <mask>    <extra_id_N>
    bytes      one token per UTF-8 byte (ByT5)   </s>           <pad>    <mask>    <extra_id_N>

The mask token and the sentinels are added only when the objective asks for them (its
``special_roles``), so a causal run's tokenizer does not change with the objectives that exist.
The byte-level kinds (bpe, bytes) and char (with byte fallback, as Llama's tokenizer) encode
any text and decode it back exactly; wordpiece and unigram turn what their vocabulary lacks
into their unknown token ([UNK], <unk>), and wordpiece decodes with single spaces between
words (BERT's decoder).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxformer.data.errors import DataError

# Objective roles (``Objective.special_roles``): what an objective needs from the tokenizer.
MASK_ROLE = "mask"
SENTINELS_ROLE = "sentinels"
# T5 reserves 100 sentinels for 512-token inputs; 64 cover ~1,000 input tokens at the default
# density 0.15 and mean span 3 (one span per 20 tokens). More spans are a config-time error.
N_SENTINELS = 64


@dataclasses.dataclass(frozen=True)
class TokenizerKind:
    """The special tokens of one kind of tokenizer, by name (None: the kind has none)."""

    name: str
    base: tuple[str, ...]  # the special tokens every tokenizer of the kind has, in id order
    eos: str  # ends each document (and starts the next)
    pad: str  # pads; starts an encoder-decoder's decoder
    mask: str  # masked LM's mask token (added when the objective asks for it, unless in base)
    sentinel_format: str | None  # span corruption's i-th sentinel; None: the kind has none
    unk: str | None = None

    def sentinel(self, i: int) -> str:
        if self.sentinel_format is None:
            raise DataError(f"a {self.name} tokenizer has no sentinel tokens")
        return self.sentinel_format.format(i)

    def sentinels(self) -> list[str]:
        return [self.sentinel(i) for i in range(N_SENTINELS)]

    def supports(self, role: str) -> bool:
        return role != SENTINELS_ROLE or self.sentinel_format is not None

    def extra_tokens(self, roles: Sequence[str]) -> tuple[str, ...]:
        """The special tokens beyond ``base`` that objectives with ``roles`` need."""
        extra: list[str] = []
        for role in roles:
            if role == MASK_ROLE:
                extra.append(self.mask)
            elif role == SENTINELS_ROLE:
                extra.extend(self.sentinels())
            else:
                raise ValueError(f"unknown special-token role {role!r}")
        return tuple(t for t in extra if t not in self.base)


_T5 = ("<pad>", "</s>", "<unk>")  # T5's and ByT5's order: pad 0, end 1, unknown 2
KINDS: dict[str, TokenizerKind] = {k.name: k for k in (
    TokenizerKind("bpe", ("<|endoftext|>", "<|pad|>"), "<|endoftext|>", "<|pad|>", "<|mask|>",
                  "<|extra_{}|>"),
    TokenizerKind("wordpiece", ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"), "[SEP]", "[PAD]",
                  "[MASK]", None, unk="[UNK]"),
    TokenizerKind("unigram", _T5, "</s>", "<pad>", "<mask>", "<extra_id_{}>", unk="<unk>"),
    TokenizerKind("char", _T5, "</s>", "<pad>", "<mask>", "<extra_id_{}>", unk="<unk>"),
    TokenizerKind("bytes", _T5, "</s>", "<pad>", "<mask>", "<extra_id_{}>", unk="<unk>"),
)}
N_BYTES = 256


def get_kind(name: str) -> TokenizerKind:
    if name not in KINDS:
        raise DataError(f"unknown tokenizer kind {name!r} (choose one of {', '.join(KINDS)})")
    return KINDS[name]


def kind_of(tokenizer: Any) -> TokenizerKind:
    """The kind of a tokenizer jaxformer trained, told from the tokenizer itself: WordPiece and
    Unigram models are wordpiece and unigram; a BPE with ``<|endoftext|>`` is bpe; a BPE with
    byte fallback is char, any other BPE bytes. Anything that is not a ``tokenizers``
    tokenizer (the synthetic tasks' ``SymbolTokenizer``) uses bpe's names."""
    model = getattr(tokenizer, "model", None)
    if isinstance(model, models.WordPiece):
        return KINDS["wordpiece"]
    if isinstance(model, models.Unigram):
        return KINDS["unigram"]
    if not isinstance(model, models.BPE) or tokenizer.token_to_id(KINDS["bpe"].eos) is not None:
        return KINDS["bpe"]
    return KINDS["char"] if model.byte_fallback else KINDS["bytes"]


def min_vocab_size(kind: str, n_extra: int) -> int:
    """The smallest ``model.vocab_size`` a ``kind`` tokenizer with ``n_extra`` added special
    tokens can have (bpe: its bytes and some merges; bytes: its 256 bytes; char: its 256
    fallback bytes and a few characters; wordpiece, unigram: a few pieces; the trained
    tokenizer is checked again against the corpus)."""
    n_special = len(KINDS[kind].base) + n_extra
    return n_special + {"bpe": N_BYTES + 42, "bytes": N_BYTES, "char": N_BYTES + 8}.get(kind, 8)


def train(kind: str, texts: Sequence[str], vocab_size: int,
          extra_special_tokens: Sequence[str] = ()) -> Tokenizer:
    """A ``kind`` tokenizer with at most ``vocab_size`` tokens, trained on ``texts``: its base
    special tokens get ids 0, 1, ... in order, ``extra_special_tokens`` the next ids.
    DataError when ``vocab_size`` cannot hold what the texts need."""
    spec = get_kind(kind)
    specials = [*spec.base, *(t for t in extra_special_tokens if t not in spec.base)]
    if vocab_size < min_vocab_size(kind, len(specials) - len(spec.base)):
        raise DataError(f"vocab size {vocab_size} is too small for a {kind} tokenizer with "
                        f"{len(specials)} special tokens: it needs at least "
                        f"{min_vocab_size(kind, len(specials) - len(spec.base))}")
    try:
        tok = _TRAINERS[kind](spec, list(texts), vocab_size, specials)
    except DataError:
        raise
    except Exception as e:  # the trainers raise plain Exceptions ("vocabulary not large ...")
        raise DataError(f"cannot train a {kind} tokenizer of {vocab_size} tokens on this "
                        f"corpus: {str(e).strip()[:200]}") from e
    if tok.get_vocab_size() > vocab_size:
        raise DataError(f"vocab size {vocab_size} is too small for a {kind} tokenizer of this "
                        f"corpus: its characters and special tokens alone take "
                        f"{tok.get_vocab_size()} tokens")
    return tok


def _bpe(spec: TokenizerKind, texts: list[str], vocab_size: int,
         specials: list[str]) -> Tokenizer:
    """GPT-2's byte-level BPE: every byte a token (spelled as a printable character), merges
    learned on the texts; the result can be smaller than ``vocab_size`` when the texts do not
    hold enough distinct merges."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        # All 256 bytes, even those absent from the training texts, so any text is encodable.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def _wordpiece(spec: TokenizerKind, texts: list[str], vocab_size: int,
               specials: list[str]) -> Tokenizer:
    """BERT's WordPiece (cased, no normalizer): words split at whitespace and punctuation,
    pieces after a word's first one prefixed ``##``."""
    tok = Tokenizer(models.WordPiece(unk_token=spec.unk))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    # Every character that starts or continues a word in the texts can start one, so a word
    # is unknown only when it holds a character the texts lack (or continues one oddly).
    alphabet = sorted({c for text in texts for c in text if not c.isspace()})
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
        show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def _unigram(spec: TokenizerKind, texts: list[str], vocab_size: int,
             specials: list[str]) -> Tokenizer:
    """SentencePiece's Unigram (as T5, without normalizer): spaces become ``▁`` word starts."""
    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    # The characters of the special tokens are pieces, so that a special token's text in a
    # document ("</s>" in HTML) can be spelled with ordinary pieces ...
    alphabet = sorted({c for t in specials for c in t})
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      unk_token=spec.unk, max_piece_length=16,
                                      initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    # ... and is: the Unigram lattice would otherwise pick the special piece itself (score 0,
    # the best there is), even with `encode_special_tokens`.
    pieces = json.loads(tok.to_str())["model"]["vocab"]
    floor = min(score for _, score in pieces) - 1000.0
    special = set(specials)
    tok.model = models.Unigram([(p, floor if p in special else score) for p, score in pieces],
                               unk_id=specials.index(spec.unk), byte_fallback=False)
    return tok


def _char(spec: TokenizerKind, texts: list[str], vocab_size: int,
          specials: list[str]) -> Tokenizer:
    """One token per character: the most frequent characters of the texts (as many as fit
    beside the special tokens and the 256 byte tokens ``<0x00>``..``<0xFF>``), and the UTF-8
    bytes of any other character (byte fallback)."""
    room = vocab_size - len(specials) - N_BYTES
    learner = Tokenizer(models.BPE(unk_token=spec.unk))
    # No merges (max_token_length=1): BPE's trainer only learns the alphabet.
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + room, limit_alphabet=room,
                                  max_token_length=1, special_tokens=specials,
                                  show_progress=False)
    learner.train_from_iterator(texts, trainer)
    vocab = learner.get_vocab(with_added_tokens=True)
    for b in range(N_BYTES):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=spec.unk, byte_fallback=True))
    tok.add_special_tokens(specials)
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return tok


def _bytes(spec: TokenizerKind, texts: list[str], vocab_size: int,
           specials: list[str]) -> Tokenizer:
    """One token per UTF-8 byte (ByT5), spelled as byte-level BPE spells bytes, no merges."""
    del vocab_size  # always the special tokens + 256 bytes
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=len(specials) + N_BYTES, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


_TRAINERS = {"bpe": _bpe, "wordpiece": _wordpiece, "unigram": _unigram, "char": _char,
             "bytes": _bytes}


# --- word boundaries (whole-word masking) ---------------------------------------------------

# Byte-level BPE maps every byte to a printable character (GPT-2's `bytes_to_unicode`):
# the bytes that are already printable Latin-1 stay themselves, the rest are shifted to 256+.
_PRINTABLE_BYTES = (
    list(range(ord("!"), ord("~") + 1))
    + list(range(ord("¡"), ord("¬") + 1))
    + list(range(ord("®"), ord("ÿ") + 1))
)


def _byte_level_char_to_byte() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> character map (256 entries)."""
    chars = {b: chr(b) for b in _PRINTABLE_BYTES}
    shifted = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shifted)
            shifted += 1
    return {c: b for b, c in chars.items()}


BYTE_OF_CHAR = _byte_level_char_to_byte()


def _starts_by_first_byte(token: str) -> bool:
    """Byte-level spelling (bpe, bytes): a token begins a word when its first byte
    is not an ASCII letter or digit (a space "Ġ", newline "Ċ", punctuation); a letter, digit
    or non-ASCII byte (a UTF-8 lead or continuation byte) continues the previous word. Why
    bytes and not the first character: byte-level strings spell bytes >= 0x80 as Latin-1
    lookalikes ("©" for 0xA9), whose ``isalnum`` says nothing about the text."""
    first = BYTE_OF_CHAR.get(token[0])
    if first is None:  # not a byte-level string: judge the character itself
        return not token[0].isalnum()
    return first < 0x80 and not chr(first).isalnum()


def _starts_by_kind(kind: str, token: str) -> bool:
    if kind == "wordpiece":
        return not token.startswith("##")
    if kind == "unigram":
        return token.startswith("▁")
    if kind == "char":
        if len(token) == 1:  # a character as it is, not a byte's spelling
            return not token.isalnum()
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # a fallback
            byte = int(token[3:5], 16)
            return byte < 0x80 and not chr(byte).isalnum()
    return _starts_by_first_byte(token)


def word_starts(tokenizer: Any) -> np.ndarray:
    """[V] bool: True for the tokens that begin a word, by the tokenizer kind's own word
    boundaries: a piece without ``##`` (wordpiece), a piece with ``▁`` (unigram), a first
    byte that is not an ASCII letter or digit (bpe's "Ġ" space, bytes, char); every special
    (added) token begins one too."""
    kind = kind_of(tokenizer).name
    V = tokenizer.get_vocab_size(with_added_tokens=True)
    starts = np.zeros(V, dtype=bool)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=True).items():
        if 0 <= token_id < V and token:
            starts[token_id] = _starts_by_kind(kind, token)
    for token_id in tokenizer.get_added_tokens_decoder():
        if 0 <= token_id < V:
            starts[token_id] = True
    return starts


def special_ids(tokenizer: Any) -> list[int]:
    """Ids of the tokenizer's special (added) tokens: end, padding, mask, sentinels, unknown."""
    return sorted(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special)


def role_ids(tokenizer: Any, role: str, objective: str) -> list[int]:
    """The ids of the tokenizer's ``role`` tokens (the mask token, or every sentinel); a
    DataError naming ``objective`` when the tokenizer lacks one."""
    spec = kind_of(tokenizer)
    if not spec.supports(role):
        raise DataError(f"objective.kind={objective!r} needs {role} tokens, which a "
                        f"{spec.name} tokenizer does not have")
    names = [spec.mask] if role == MASK_ROLE else spec.sentinels()
    ids = [tokenizer.token_to_id(t) for t in names]
    if None in ids:
        missing = names[ids.index(None)]
        raise DataError(f"objective.kind={objective!r} needs the special token {missing!r}, "
                        f"which the {spec.name} tokenizer lacks (a tokenizer trained for "
                        "another objective?)")
    return ids

