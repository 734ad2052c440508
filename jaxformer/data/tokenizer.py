"""The run's tokenizer (HF `tokenizers`): train, save, load, encode.

The default kind is a byte-level BPE: every byte has a token, so any UTF-8 text (code with
tabs, unicode, odd whitespace) encodes without unknown tokens and decodes back exactly. The
other kinds (`data.tokenizer`: wordpiece, unigram, char, bytes) and their special tokens are
in `jaxformer.data.tokenizer_kinds`.
"""

import os
import pathlib
import uuid
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Encoding, Tokenizer

from jaxformer.data import tokenizer_kinds
from jaxformer.data.errors import DataError

EOS = tokenizer_kinds.KINDS["bpe"].eos  # "<|endoftext|>"
PAD = tokenizer_kinds.KINDS["bpe"].pad  # "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)  # in id order: EOS = 0, PAD = 1

# 256 byte tokens + the special tokens + room for at least a few merges; below this BPE learns
# (almost) nothing and the "tokenizer" is just bytes.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 42


def train_tokenizer(texts: Iterable[str], vocab_size: int,
                    extra_special_tokens: Sequence[str] = (), kind: str = "bpe") -> Tokenizer:
    """Train a byte-level BPE tokenizer with at most `vocab_size` tokens on `texts` (another
    `kind`: `tokenizer_kinds.train`).

    EOS gets id 0, PAD id 1, then `extra_special_tokens` (an objective's mask token or
    sentinels) ids 2, 3, ... The result can be smaller than `vocab_size` when the texts do not
    hold enough distinct merges; use `tok.get_vocab_size()` for the actual size.
    """
    if kind == "bpe" and vocab_size < MIN_VOCAB_SIZE + len(extra_special_tokens):
        raise DataError(
            f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
            f"{MIN_VOCAB_SIZE} (256 bytes + {len(SPECIAL_TOKENS)} special tokens + merges)"
        )
    return tokenizer_kinds.train(kind, list(texts), vocab_size, extra_special_tokens)


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tok` as a tokenizer.json file, atomically (temp file then rename).

    The file gets the mode any new file gets (0666 less the umask, usually 0644): it is a
    shareable part of a run dir, unlike mkstemp's private 0600.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:  # a plain create applies the umask
            f.write(tok.to_str())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def load_tokenizer(path: str | os.PathLike, require_eos: bool = True) -> Tokenizer:
    """Read a tokenizer.json file; DataError if missing or invalid.

    With `require_eos` (a tokenizer `save_tokenizer` wrote) it must have EOS; a converted
    Hugging Face tokenizer, whose special tokens are named in the `special_tokens.json` beside
    it (`jaxformer.data.special_tokens`), is loaded with `require_eos=False`.
    """
    path = pathlib.Path(path)
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception for unreadable/invalid files
        raise DataError(f"cannot load tokenizer {path}: {str(e).strip()[:200]}") from e
    eos = tokenizer_kinds.kind_of(tok).eos
    if require_eos and tok.token_to_id(eos) is None:
        raise DataError(f"tokenizer {path} has no {eos} token and no special_tokens.json "
                        "beside it naming its special tokens; it was not made by jaxformer (a "
                        "Hugging Face model's directory: convert it with `jaxformer convert "
                        "--from-hf` and use the run dir)")
    return tok


def eos_id(tok: Tokenizer) -> int:
    """Id of the end-of-document token (of the tokenizer's kind: EOS for byte-level BPE)."""
    eos = tokenizer_kinds.kind_of(tok).eos
    token_id = tok.token_to_id(eos)
    if token_id is None:
        raise DataError(f"tokenizer has no {eos} token")
    return token_id


def encode_documents(tok: Tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """Tokenize each text: returns one int32 array [n_tokens_i] per text.

    A literal "<|endoftext|>" (any special token) inside a document is encoded as ordinary
    text, so that EOS only ever appears where the pipeline puts it, between documents.
    """
    return [np.asarray(e.ids, dtype=np.int32) for e in encode_plain(tok, texts)]


def encode_plain(tok: Tokenizer, texts: Sequence[str]) -> list[Encoding]:
    """``tok``'s encodings of ``texts`` with special tokens' text read as plain text and no
    special tokens added (as ``encode_documents`` tokenizes documents; the encodings also
    carry the character offsets)."""
    previous = tok.encode_special_tokens
    tok.encode_special_tokens = True
    try:
        # encode_batch runs in parallel in Rust; no special tokens are added around documents.
        return tok.encode_batch(list(texts), add_special_tokens=False)
    finally:
        tok.encode_special_tokens = previous
