"""Python source tagged token by token with its lexical category: the data of
``objective.kind=token_classification``.

The labels come from the standard library's own lexer, ``tokenize.generate_tokens``:

    0 keyword    a NAME token that ``keyword.iskeyword`` accepts (def, return, None, ...)
    1 name       any other NAME token (soft keywords such as ``match`` included)
    2 number     NUMBER
    3 string     STRING (docstrings and f-strings included: one STRING token on 3.11; the
                 FSTRING_START/MIDDLE/END parts on 3.12+)
    4 operator   OP (brackets, punctuation, ``=``, ``->``, ...)
    5 comment    COMMENT

Everything else (NEWLINE, NL, INDENT, DEDENT, ENDMARKER, the whitespace between tokens) has no
category. Each character of a document gets the category of the lexical token that covers it
(``char_categories``; -1 for none), and each subword of the run's tokenizer the category of
the first categorized character in its span (``subword_labels``, from the tokenizer's
offsets): a subword that is only whitespace or line breaks is unlabelled and has loss weight
0, and one that straddles two lexical tokens (BPE's ``"):"`` after a string, ``" #"``) takes
the category of the first one it covers. A document that ``tokenize`` refuses (not Python, a
syntax error) is left out, and said so in the log.

Rows hold ``seq_len`` consecutive subwords of one document, right-padded (segment id 0, loss
weight 0) when the document is shorter; no special token is added. Training row b of step s
is drawn with ``default_rng([seed, s, b])`` (a document with probability proportional to its
length, then a uniform start), so it depends on nothing else. Documents are split into
training and held-out documents by the run's text pipeline (``data.val_fraction``); the
held-out rows are every document's consecutive windows, in a fixed shuffled order.

Letters: B batch, T row length (``data.seq_len``), N characters or subwords of a document.
"""

from __future__ import annotations

import dataclasses
import io
import keyword
import sys
import time
import tokenize
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxformer.data.cache import atomic_write_bytes, cache_key, resolve_cache_dir
from jaxformer.data.errors import DataError
from jaxformer.data.packing import stack_examples
from jaxformer.data.sources import load_documents
from jaxformer.data.tokenizer import encode_plain

CATEGORIES = ("keyword", "name", "number", "string", "operator", "comment")
UNLABELLED = -1
_KEYWORD, _NAME, _NUMBER, _STRING, _OPERATOR, _COMMENT = range(len(CATEGORIES))
_BY_TYPE = {tokenize.NUMBER: _NUMBER, tokenize.STRING: _STRING, tokenize.OP: _OPERATOR,
            tokenize.COMMENT: _COMMENT}
# Python 3.12 lexes f-strings into parts; all of them are the string's characters (nested
# replacement fields come as ordinary tokens in between, and keep their own categories).
for _part in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):
    if hasattr(tokenize, _part):
        _BY_TYPE[getattr(tokenize, _part)] = _STRING
# Bump when the labelling rules change, to orphan cached labels.
_RULES_VERSION = 1
Tagged = tuple[np.ndarray, np.ndarray]  # a document's subword ids [n] and labels [n] int32
# The validation rows' order: fixed, far from any training seed.
_VAL_ORDER_SEED = 2**31 - 1


def char_categories(text: str) -> np.ndarray | None:
    """The category index of each character of Python source ``text`` -> [N] int8, -1 where no
    lexical token of a category covers the character; None when ``tokenize`` refuses the
    text (a tokenize.TokenError or SyntaxError: unterminated brackets, bad indentation)."""
    cats = np.full(len(text), UNLABELLED, np.int8)
    reader = io.StringIO(text)  # lines end at "\n" only, as tokenize counts them
    line_starts: list[int] = []  # character offset of each line tokenize has read
    read = [0]

    def readline() -> str:
        line = reader.readline()
        line_starts.append(read[0])
        read[0] += len(line)
        return line

    try:
        for tok in tokenize.generate_tokens(readline):
            if tok.type == tokenize.NAME:
                cat = _KEYWORD if keyword.iskeyword(tok.string) else _NAME
            elif tok.type in _BY_TYPE:
                cat = _BY_TYPE[tok.type]
            else:
                continue
            (r0, c0), (r1, c1) = tok.start, tok.end
            cats[line_starts[r0 - 1] + c0:line_starts[r1 - 1] + c1] = cat
    except (tokenize.TokenError, SyntaxError):
        return None
    return cats


def subword_labels(categories: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each subword's label: the category of the first categorized character of its span.

    categories: [N] per character (``char_categories``); offsets: [n, 2] int, the
    [start, end) character span of each subword -> [n] int32, UNLABELLED (-1) for a subword
    whose span holds no categorized character (whitespace, line breaks, an empty span).
    """
    n = len(categories)
    if len(offsets) == 0:
        return np.zeros(0, np.int32)
    # next_cat[p]: the first position >= p with a category (n when none), a reversed running
    # minimum, so each subword's label is one lookup.
    positions = np.where(categories >= 0, np.arange(n), n)
    next_cat = np.append(np.minimum.accumulate(positions[::-1])[::-1], n)
    start = np.clip(offsets[:, 0], 0, n)
    first = next_cat[start]
    found = first < offsets[:, 1]
    padded = np.append(categories, UNLABELLED).astype(np.int32)
    return np.where(found, padded[np.minimum(first, n)], UNLABELLED).astype(np.int32)


def encode_with_offsets(tokenizer: Tokenizer, texts: Sequence[str]
                        ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each text's subword ids [n] int32 and character offsets [n, 2], tokenized as the text
    pipeline tokenizes documents (special tokens' text as plain text, none added)."""
    return [(np.asarray(e.ids, np.int32), np.asarray(e.offsets, np.int64).reshape(-1, 2))
            for e in encode_plain(tokenizer, texts)]


def tag_documents(tokenizer: Tokenizer, texts: Sequence[str]) -> dict[int, Tagged]:
    """-> {index into ``texts``: (ids [n] int32, labels [n] int32)} of each document that
    tokenize accepts (the others are missing)."""
    cats = {i: c for i, text in enumerate(texts) if (c := char_categories(text)) is not None}
    encoded = encode_with_offsets(tokenizer, [texts[i] for i in cats])
    return {i: (ids, subword_labels(cats[i], offsets))
            for i, (ids, offsets) in zip(cats, encoded, strict=True)}


def load_tagged(source: str, tokenizer: Tokenizer, text_field: str = "text",
                cache_dir: str | None = None, log: Callable[[str], None] = print
                ) -> tuple[dict[int, Tagged], int]:
    """The documents of ``source`` (as ``jaxformer.data.sources.load_documents`` lists them,
    the indices the text pipeline splits) tagged -> ({document index: (ids, labels)} of the
    documents tokenize accepts, the number of documents). Cached under the data cache
    (``data.cache_dir``) by the documents, the tokenizer and the Python version (whose lexer
    and keywords define the labels)."""
    start = time.perf_counter()
    root = resolve_cache_dir(cache_dir)
    docs = load_documents(source, text_field, cache_dir=str(root / "datasets"))
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    key = cache_key("python_tags", _RULES_VERSION, version, docs.fingerprint, tokenizer.to_str())
    path = root / "python_tags" / f"{key}.npz"
    tagged, how = _load_cache(path), "cached"
    if tagged is None:
        tagged, how = tag_documents(tokenizer, docs.texts), "tagged"
        _save_cache(path, tagged)
    log(f"python tags: {len(tagged)} of {len(docs.texts)} documents {how} in "
        f"{time.perf_counter() - start:.1f}s")
    return tagged, len(docs.texts)


def _save_cache(path: Path, tagged: dict[int, Tagged]) -> None:
    index = np.fromiter(tagged, np.int64, len(tagged))
    lengths = np.fromiter((len(ids) for ids, _ in tagged.values()), np.int64, len(tagged))
    ids = [t[0] for t in tagged.values()] or [np.zeros(0, np.int32)]
    labels = [t[1] for t in tagged.values()] or [np.zeros(0, np.int32)]
    buf = io.BytesIO()
    np.savez(buf, index=index, offsets=np.concatenate([[0], np.cumsum(lengths)]),
             ids=np.concatenate(ids).astype(np.int32),
             labels=np.concatenate(labels).astype(np.int8))
    atomic_write_bytes(path, buf.getvalue())


def _load_cache(path: Path) -> dict[int, Tagged] | None:
    """Inverse of ``_save_cache``; None when the entry is missing or damaged."""
    try:
        with np.load(path) as f:
            index, offsets, ids, labels = f["index"], f["offsets"], f["ids"], f["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None
    return {int(i): (ids[a:b], labels[a:b].astype(np.int32))
            for i, a, b in zip(index, offsets[:-1], offsets[1:], strict=True)}


@dataclasses.dataclass
class PythonTags:
    """Tagged training and held-out documents as step-indexed rows of ``seq_len``."""

    train_docs: list[Tagged]  # (ids [n], labels [n]) per document
    val_docs: list[Tagged]
    seq_len: int
    pad_id: int
    n_refused: int = 0

    def __post_init__(self) -> None:
        lengths = np.array([len(ids) for ids, _ in self.train_docs], np.float64)
        self._doc_p = lengths / lengths.sum()
        # Held-out windows (document, start), every document cut into consecutive rows.
        windows = [(d, s) for d, (ids, _) in enumerate(self.val_docs)
                   for s in range(0, len(ids), self.seq_len)]
        order = np.random.default_rng(_VAL_ORDER_SEED).permutation(len(windows))
        self._val_windows = [windows[i] for i in order]

    @classmethod
    def create(cls, tagged: dict[int, Tagged], n_docs: int, train_ids: Sequence[int],
               val_ids: Sequence[int], seq_len: int, pad_id: int,
               log: Callable[[str], None] = print) -> PythonTags:
        """Keeps the tagged documents (``load_tagged``) at ``train_ids`` for training, those at
        ``val_ids`` held out; a DataError when no training document is Python that
        ``tokenize`` accepts."""
        refused = n_docs - len(tagged)
        train = [tagged[i] for i in train_ids if i in tagged and len(tagged[i][0])]
        val = [tagged[i] for i in val_ids if i in tagged and len(tagged[i][0])]
        if not train or not any((labels >= 0).any() for _, labels in train):
            raise DataError(f"objective.kind='token_classification' tags Python source, but "
                            f"tokenize accepted no training document ({refused} of "
                            f"{n_docs} refused); use data.source=stdlib or a directory of "
                            ".py files")
        data = cls(train, val, seq_len, pad_id, refused)
        counts = data.class_counts()
        shares = ", ".join(f"{c} {n / max(counts.sum(), 1):.1%}"
                           for c, n in zip(CATEGORIES, counts, strict=True))
        unlabelled = sum(int((lab < 0).sum()) for _, lab in train)
        log(f"python tags: {len(train)} training, {len(val)} held-out documents"
            + (f" ({refused} refused by tokenize)" if refused else "")
            + f"; training subwords {shares}; {unlabelled} unlabelled (whitespace)")
        return data

    def class_counts(self) -> np.ndarray:
        """Labelled training subwords per category -> [len(CATEGORIES)] int64."""
        labels = np.concatenate([lab for _, lab in self.train_docs])
        return np.bincount(labels[labels >= 0], minlength=len(CATEGORIES))

    def _row(self, ids: np.ndarray, labels: np.ndarray, start: int) -> dict[str, np.ndarray]:
        t = self.seq_len
        window, tags = ids[start:start + t], labels[start:start + t]
        n = len(window)
        inputs = np.full(t, self.pad_id, np.int32)
        inputs[:n] = window
        targets = np.zeros(t, np.int32)
        targets[:n] = np.maximum(tags, 0)
        weights = np.zeros(t, np.float32)
        weights[:n] = tags >= 0
        return {"inputs": inputs, "targets": targets, "loss_weights": weights,
                "segment_ids": (np.arange(t) < n).astype(np.int32),
                "positions": np.arange(t, dtype=np.int32)}

    def _draw(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        ids, labels = self.train_docs[int(rng.choice(len(self.train_docs), p=self._doc_p))]
        start = int(rng.integers(0, max(len(ids) - self.seq_len, 0) + 1))
        return self._row(ids, labels, start)

    def train_batch(self, step: int, batch_size: int, seed: int,
                    rows: range | None = None) -> dict[str, np.ndarray]:
        """Rows [B, T] of step ``step``, row b from default_rng([seed, step, b]); ``rows``:
        only these rows of the global batch."""
        rows = range(batch_size) if rows is None else rows
        return stack_examples([self._draw(np.random.default_rng([seed, step, b])) for b in rows])

    def n_val_batches(self, batch_size: int, max_batches: int | None = None) -> int:
        n = -(-len(self._val_windows) // batch_size)
        return n if max_batches is None else min(n, max_batches)

    def val_batches(self, batch_size: int, max_batches: int | None = None
                    ) -> Iterator[dict[str, np.ndarray]]:
        """The held-out windows in their fixed order, ``batch_size`` rows a batch (the last
        one completed with rows of zero loss weight); at most ``max_batches`` (None: all)."""
        for k in range(self.n_val_batches(batch_size, max_batches)):
            rows = [self._row(*self.val_docs[d], s)
                    for d, s in self._val_windows[k * batch_size:(k + 1) * batch_size]]
            while len(rows) < batch_size:  # segment id 1: no fully masked attention row
                rows.append({**self._row(np.zeros(0, np.int32), np.zeros(0, np.int32), 0),
                             "segment_ids": np.ones(self.seq_len, np.int32)})
            yield stack_examples(rows)

    def majority_baseline(self, batch_size: int, max_batches: int | None = None) -> float:
        """The held-out token accuracy of always answering the most frequent training
        category, over the labelled subwords of ``val_batches(batch_size, max_batches)``;
        NaN without held-out documents."""
        majority = int(np.argmax(self.class_counts()))
        hits = total = 0.0
        for batch in self.val_batches(batch_size, max_batches):
            w = batch["loss_weights"]
            hits += float((w * (batch["targets"] == majority)).sum())
            total += float(w.sum())
        return hits / total if total else float("nan")
