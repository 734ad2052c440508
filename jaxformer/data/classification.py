"""A labeled task built from the embedded corpus: which standard-library package does a code
snippet come from? (e.g. asyncio vs email vs xml vs multiprocessing.)

Classes are the ``n_classes`` top-level stdlib packages with the most files (``encodings``
left out: its codec tables are told apart by their first characters). Files are split into
training and held-out files, so a held-out snippet comes from a file never seen in training.
A snippet is ``snippet_len - 1`` consecutive tokens of one file after a leading EOS, the token
whose final hidden state the classifier's pooler reads (BERT's [CLS]).

Letters: B batch, T snippet length.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from collections.abc import Iterator

import numpy as np
from tokenizers import Tokenizer

from jaxformer.data.errors import DataError
from jaxformer.data.packing import stack_examples
from jaxformer.data.stdlib_corpus import stdlib_files, stdlib_root
from jaxformer.data.tokenizer import encode_documents, eos_id

_LEFT_OUT = {"encodings"}
SOURCE = "stdlib_packages"


def package_files(n_classes: int) -> tuple[list[str], list[list[str]]]:
    """-> (class names, the files of each class), largest packages first."""
    root = stdlib_root()
    by_package: dict[str, list[str]] = collections.defaultdict(list)
    for path in stdlib_files():
        parts = path.relative_to(root).parts
        if len(parts) > 1 and parts[0] not in _LEFT_OUT:
            by_package[parts[0]].append(str(path))
    ranked = sorted(by_package, key=lambda p: (-len(by_package[p]), p))[:n_classes]
    if len(ranked) < n_classes:
        raise DataError(f"the stdlib has only {len(ranked)} packages; asked for {n_classes}")
    return ranked, [by_package[p] for p in ranked]


@dataclasses.dataclass
class PackageSnippets:
    """Training snippets drawn per (seed, step); a fixed, class-balanced held-out set."""

    classes: list[str]
    train_docs: list[list[np.ndarray]]  # per class: token arrays of its training files
    val_docs: list[list[np.ndarray]]
    snippet_len: int
    start_id: int

    @classmethod
    def create(cls, tokenizer: Tokenizer, n_classes: int, snippet_len: int,
               val_fraction: float = 0.2, seed: int = 0) -> PackageSnippets:
        classes, files = package_files(n_classes)
        rng = np.random.default_rng([seed, 7])
        train_docs, val_docs = [], []
        for paths in files:
            texts = [pathlib.Path(p).read_text(encoding="utf-8") for p in paths]
            tokens = encode_documents(tokenizer, texts)
            tokens = [t for t in tokens if len(t) >= snippet_len]
            if len(tokens) < 2:
                raise DataError(f"too few files of {snippet_len}+ tokens to split a class")
            order = rng.permutation(len(tokens))
            n_val = max(1, round(val_fraction * len(tokens)))
            val_docs.append([tokens[i] for i in order[:n_val]])
            train_docs.append([tokens[i] for i in order[n_val:]])
        return cls(classes, train_docs, val_docs, snippet_len, eos_id(tokenizer))

    def _example(self, doc: np.ndarray, label: int, rng: np.random.Generator
                 ) -> dict[str, np.ndarray]:
        n = self.snippet_len - 1
        start = int(rng.integers(0, len(doc) - n + 1))
        t = self.snippet_len
        return {"inputs": np.concatenate([[self.start_id], doc[start:start + n]]).astype(np.int32),
                "segment_ids": np.ones(t, np.int32), "positions": np.arange(t, dtype=np.int32),
                "targets": np.asarray([label], np.int32),
                "loss_weights": np.ones(1, np.float32)}

    def _draw(self, docs: list[list[np.ndarray]], rng: np.random.Generator
              ) -> dict[str, np.ndarray]:
        label = int(rng.integers(len(docs)))  # classes drawn uniformly
        files = docs[label]
        return self._example(files[int(rng.integers(len(files)))], label, rng)

    def train_batch(self, step: int, batch_size: int, seed: int,
                    rows: range | None = None) -> dict[str, np.ndarray]:
        """Row b of step s from default_rng([seed, s, b]); ``rows``: only these rows."""
        return stack_examples([self._draw(self.train_docs, np.random.default_rng([seed, step, b]))
                               for b in (range(batch_size) if rows is None else rows)])

    def val_batches(self, batch_size: int, n_batches: int) -> Iterator[dict[str, np.ndarray]]:
        """Class-balanced held-out snippets (so the majority class scores 1 / n_classes)."""
        rng = np.random.default_rng([2**31 - 1])
        for _ in range(n_batches):
            yield stack_examples([self._draw(self.val_docs, rng) for _ in range(batch_size)])
