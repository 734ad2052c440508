"""`DataPipeline`: documents -> tokenizer -> token streams -> deterministic training batches."""

import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from jaxformer.data.baseline import unigram_cross_entropy
from jaxformer.data.cache import (
    cache_key,
    load_token_arrays,
    resolve_cache_dir,
    save_token_arrays,
)
from jaxformer.data.errors import DataError
from jaxformer.data.packing import (
    Batch,
    PackedRows,
    make_stream,
    pad_batch,
    split_documents,
)
from jaxformer.data.sources import load_documents
from jaxformer.data.special_tokens import (
    SpecialTokens,
    load_with_specials,
    of_jaxformer_tokenizer,
)
from jaxformer.data.tokenizer import (
    MIN_VOCAB_SIZE,
    encode_documents,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
)
from jaxformer.data.tokenizer_kinds import get_kind, kind_of, min_vocab_size

# How many epoch permutations to keep: a batch spans at most a few epochs unless it is larger
# than the data, and consecutive steps reuse the same one.
_PERMUTATION_CACHE_SIZE = 4


class DataPipeline:
    """Training and validation data for one run: build it with `DataPipeline.create`.

    Training batches are a pure function of (seed, step), so a resumed run sees exactly the
    batches it would have seen, and every process can compute its own slice independently.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        train: PackedRows,
        val: PackedRows | None,
        train_doc_ids: np.ndarray,
        val_doc_ids: np.ndarray,
        n_skipped: int,
        data_manifest: dict[str, Any] | None = None,
        specials: SpecialTokens | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        # None: a tokenizer jaxformer trained, whose special tokens are found by name.
        self._specials = specials or of_jaxformer_tokenizer(tokenizer)
        self._eos_id = _document_end(self._specials)
        self._train = train
        self._val = val
        self._train_doc_ids = train_doc_ids
        self._val_doc_ids = val_doc_ids
        self._n_skipped = n_skipped
        self._data_manifest = data_manifest
        self._permutations: dict[tuple[int, int], np.ndarray] = {}

    @classmethod
    def create(
        cls,
        source: str,
        seq_len: int,
        vocab_size: int,
        val_fraction: float,
        seed: int,
        tokenizer_path: pathlib.Path | None = None,
        text_field: str = "text",
        cache_dir: str | pathlib.Path | None = None,
        log: Callable[[str], None] = print,
        extra_special_tokens: Sequence[str] = (),
        tokenizer_kind: str = "bpe",
    ) -> "DataPipeline":
        """Load `source`, get a tokenizer, tokenize, split by document and pack into rows.

        The tokenizer is loaded from `tokenizer_path` if that file exists (a resumed run keeps
        its tokenizer); otherwise it is trained on the training documents only (or taken from
        the cache). Nothing is written to `tokenizer_path`: the caller saves `self.tokenizer`
        there once it commits to the run. Trained tokenizers and tokenized documents are
        cached under `cache_dir` (default $JAXFORMER_CACHE or ~/.cache/jaxformer).
        `extra_special_tokens` are added to a newly trained tokenizer after EOS and PAD.
        `tokenizer_kind` (`jaxformer.data.tokenizer_kinds`) is the kind a new tokenizer is:
        byte-level BPE, wordpiece, unigram, char or bytes.

        A loaded tokenizer that came with a Hugging Face model has its special tokens named in
        the `special_tokens.json` beside it (`jaxformer.data.special_tokens`): documents end
        with its (first) end token rather than EOS, and start with its begin token when its
        tokenizer puts one before text (`add_bos`: Llama, Mistral), as the model saw them.
        """
        if seq_len < 1:
            raise DataError(f"sequence length must be at least 1, got {seq_len}")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        if source.startswith("lra:"):  # jaxformer.data.lra: generated, with its own vocabulary
            raise DataError(f"data.source={source!r} is a classification task with its own "
                            "vocabulary; set objective.kind=classification")
        has_tokenizer = tokenizer_path is not None and pathlib.Path(tokenizer_path).is_file()
        get_kind(tokenizer_kind)
        if not has_tokenizer and tokenizer_kind == "bpe" and vocab_size < MIN_VOCAB_SIZE:
            raise DataError(
                f"vocab size {vocab_size} is too small: a byte-level BPE needs at least "
                f"{MIN_VOCAB_SIZE} (256 bytes + special tokens + merges)"
            )
        n_extra = len(extra_special_tokens)
        if (not has_tokenizer and tokenizer_kind != "bpe"
                and vocab_size < min_vocab_size(tokenizer_kind, n_extra)):
            raise DataError(
                f"vocab size {vocab_size} is too small for a {tokenizer_kind} tokenizer with "
                f"{n_extra} added special tokens: it needs at least "
                f"{min_vocab_size(tokenizer_kind, n_extra)}")
        root = resolve_cache_dir(cache_dir)

        start = time.perf_counter()
        docs = load_documents(source, text_field, cache_dir=str(root / "datasets"))
        # e.g. " (skipped 2 of 20 files: 1 empty, 1 binary; e.g. corpus/x.bin)"
        skipped = f" ({docs.skip_summary()})" if docs.n_skipped else ""
        log(
            f"data: {len(docs.texts)} documents{skipped} from {source} "
            f"in {time.perf_counter() - start:.1f}s"
        )
        train_ids, val_ids = split_documents(len(docs.texts), val_fraction, seed)

        start = time.perf_counter()
        if has_tokenizer:
            tok, specials = load_with_specials(tokenizer_path)
            how = f"loaded from {tokenizer_path}"
            if tok.get_vocab_size() != vocab_size:
                how += f"; it overrides the requested vocab size {vocab_size}"
            if specials != of_jaxformer_tokenizer(tok):  # a converted model's own tokens
                how += (f"; documents end with token {specials.eos_id}"
                        + (f", begin with token {specials.bos_id}" if specials.add_bos else ""))
            elif kind_of(tok).name != tokenizer_kind:
                how += (f"; a {kind_of(tok).name} tokenizer (data.tokenizer={tokenizer_kind!r} "
                        "applies to a new run's tokenizer)")
        else:
            train_texts = [docs.texts[i] for i in train_ids]
            tok, how = _cached_tokenizer(root, docs.fingerprint, vocab_size, train_ids, train_texts,
                                         tuple(extra_special_tokens), tokenizer_kind)
            specials = of_jaxformer_tokenizer(tok)
        eos = _document_end(specials, tokenizer_path)
        elapsed = time.perf_counter() - start
        log(f"tokenizer: {how} (vocab {tok.get_vocab_size()}) in {elapsed:.1f}s")

        start = time.perf_counter()
        tokens, how = _cached_tokens(root, docs.fingerprint, tok, docs.texts)
        if specials.add_bos:
            tokens = [np.concatenate([[specials.bos_id], t]).astype(t.dtype) for t in tokens]
        # Distinct seeds for the split and each stream's document order.
        train = PackedRows(
            make_stream([tokens[i] for i in train_ids], eos, seed + 1), seq_len, "training"
        )
        val = None
        if len(val_ids):
            val = PackedRows(
                make_stream([tokens[i] for i in val_ids], eos, seed + 2), seq_len, "validation"
            )
        pipeline = cls(tok, train, val, train_ids, val_ids, docs.n_skipped, docs.manifest,
                       specials)
        log(
            f"tokens: {_count(pipeline.n_train_tokens)} train ({pipeline.n_train_rows} rows), "
            f"{_count(pipeline.n_val_tokens)} val ({pipeline.n_val_rows} rows) of {seq_len}; "
            f"{how} in {time.perf_counter() - start:.1f}s"
        )
        return pipeline

    # --- sizes -------------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Actual number of tokens (can be below the requested size on small data)."""
        return self._tokenizer.get_vocab_size()

    @property
    def specials(self) -> SpecialTokens:
        """The tokenizer's special tokens (begin, end, padding) as this pipeline uses them."""
        return self._specials

    @property
    def eos_id(self) -> int:
        """The token that ends each document (EOS, or a converted tokenizer's end token)."""
        return self._eos_id

    @property
    def pad_id(self) -> int | None:
        return self._specials.pad_id

    @property
    def seq_len(self) -> int:
        return self._train.seq_len

    @property
    def n_docs(self) -> int:
        """Non-empty documents loaded (training + validation)."""
        return len(self._train_doc_ids) + len(self._val_doc_ids)

    @property
    def n_skipped(self) -> int:
        """Files skipped: unreadable, empty, binary or not valid UTF-8."""
        return self._n_skipped

    @property
    def data_manifest(self) -> dict[str, Any] | None:
        """What the data source held when loaded (`jaxformer.data.manifest`); JSON-serializable."""
        return self._data_manifest

    @property
    def train_doc_ids(self) -> np.ndarray:
        """Indices (into the loaded documents) of the training documents, sorted."""
        return self._train_doc_ids

    @property
    def val_doc_ids(self) -> np.ndarray:
        """Indices (into the loaded documents) of the validation documents, sorted."""
        return self._val_doc_ids

    @property
    def n_train_tokens(self) -> int:
        """Tokens in the training stream, EOS separators included."""
        return len(self._train.stream)

    @property
    def n_val_tokens(self) -> int:
        return 0 if self._val is None else len(self._val.stream)

    @property
    def train_rows(self) -> PackedRows:
        """The training stream and its rows (row r = stream[r*T : r*T + T + 1])."""
        return self._train

    @property
    def val_rows(self) -> PackedRows | None:
        """The validation stream and its rows; None without validation data."""
        return self._val

    @property
    def n_train_rows(self) -> int:
        return self._train.n_rows

    @property
    def n_val_rows(self) -> int:
        return 0 if self._val is None else self._val.n_rows

    # --- batches -----------------------------------------------------------------------------

    def train_batch(
        self,
        step: int,
        batch_size: int,
        seed: int,
        process_index: int = 0,
        process_count: int = 1,
    ) -> Batch:
        """This process's share of the global training batch of `step`: arrays [B/P, T].

        Global sample i = step * B + b (b < B) is row perm_e[i % R] of epoch e = i // R, where
        perm_e = default_rng([seed, e]).permutation(R): every epoch visits every row once.
        Process p gets samples b in [p*B/P, (p+1)*B/P), built without the other processes' rows.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if seed < 0:
            raise DataError(f"seed must be non-negative, got {seed}")
        if batch_size % process_count:
            raise DataError(
                f"batch size {batch_size} is not divisible by the {process_count} processes"
            )
        if step < 0 or not 0 <= process_index < process_count:
            raise ValueError(f"bad step {step} or process {process_index}/{process_count}")
        local = batch_size // process_count
        first = step * batch_size + process_index * local
        samples = np.arange(first, first + local, dtype=np.int64)
        n_rows = self.n_train_rows
        epochs, offsets = np.divmod(samples, n_rows)
        rows = np.empty(local, dtype=np.int64)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            rows[in_epoch] = self._permutation(seed, int(epoch))[offsets[in_epoch]]
        return self._train.batch(rows)

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        if key not in self._permutations:
            if len(self._permutations) >= _PERMUTATION_CACHE_SIZE:
                self._permutations.pop(next(iter(self._permutations)))  # oldest first
            rng = np.random.default_rng([seed, epoch])
            self._permutations[key] = rng.permutation(self.n_train_rows)
        return self._permutations[key]

    def n_val_batches(self, batch_size: int, max_batches: int | None = None) -> int:
        """How many batches `val_batches` yields."""
        n = -(-self.n_val_rows // batch_size)
        return n if max_batches is None else min(n, max_batches)

    def val_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[Batch]:
        """The validation rows in order, in batches of exactly `batch_size` rows [B, T].

        The last batch is completed with rows of zero loss weight, so every batch has the
        same shape (no recompilation) and weighted sums count each real target once.
        Yields nothing when there is no validation data.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be at least 1, got {batch_size}")
        if self._val is None:
            return
        for k in range(self.n_val_batches(batch_size, max_batches)):
            rows = np.arange(k * batch_size, min((k + 1) * batch_size, self.n_val_rows))
            yield pad_batch(self._val.batch(rows), batch_size, self._eos_id)

    def unigram_baseline(self) -> float:
        """Validation cross-entropy (nats/token) of add-one smoothed training-token frequencies.

        Computed over the same targets as the validation loss (those with loss weight 1).
        NaN when there is no validation data (validation fraction 0).
        """
        if self._val is None:
            return float("nan")
        return unigram_cross_entropy(
            self._train.stream.tokens, self._val.stream, self.seq_len, self.vocab_size
        )

    # --- text --------------------------------------------------------------------------------

    def encode(self, text: str) -> np.ndarray:
        """Token ids [n] int32 of `text`, tokenized exactly as training documents are."""
        return encode_documents(self._tokenizer, [text])[0]

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = False) -> str:
        """Text of token ids; EOS shows as its text ("<|endoftext|>") unless
        skip_special_tokens."""
        ids = np.asarray(ids).reshape(-1).tolist()
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def _document_end(specials: SpecialTokens, tokenizer_path: pathlib.Path | None = None) -> int:
    """The id documents end with; a DataError for a tokenizer without an end token."""
    if specials.eos_id is None:
        where = f" ({tokenizer_path})" if tokenizer_path is not None else ""
        raise DataError(f"the tokenizer{where} has no end-of-sequence token (eos_ids is empty "
                        "in its special_tokens.json), which training puts after each document")
    return specials.eos_id


def _cached_tokenizer(
    root: pathlib.Path,
    fingerprint: str,
    vocab_size: int,
    train_ids: np.ndarray,
    train_texts: list[str],
    extra_special_tokens: tuple[str, ...] = (),
    kind: str = "bpe",
) -> tuple[Tokenizer, str]:
    """The tokenizer for these training documents: from the cache, else trained and cached."""
    parts = [vocab_size, train_ids.astype(np.int64).tobytes()]
    if extra_special_tokens:  # the key of a plain tokenizer stays what it always was
        parts.append("\n".join(extra_special_tokens))
    if kind != "bpe":  # so does the key of a byte-level BPE
        parts.append(f"kind={kind}")
    key = cache_key("tokenizer", fingerprint, *parts)
    path = root / "tokenizers" / f"{key}.json"
    if path.is_file():
        try:
            return load_tokenizer(path), "cached"
        except DataError:
            pass  # unreadable cache entry: train again and overwrite it
    tok = train_tokenizer(train_texts, vocab_size, extra_special_tokens, kind)
    save_tokenizer(tok, path)
    what = "" if kind == "bpe" else f"{kind} "
    return tok, f"{what}trained on {len(train_texts)} training documents"


def _cached_tokens(
    root: pathlib.Path, fingerprint: str, tok: Tokenizer, texts: list[str]
) -> tuple[list[np.ndarray], str]:
    """Every document tokenized ([n_i] int32 each): from the cache, else encoded and cached.

    The key is the data and the tokenizer itself: the split does not change any document's
    tokens, and a tokenizer trained on another split is a different tokenizer.
    """
    key = cache_key("tokens", fingerprint, tok.to_str())
    path = root / "tokens" / f"{key}.npz"
    tokens = load_token_arrays(path)
    if tokens is not None and len(tokens) == len(texts):
        return tokens, "tokens cached"
    tokens = encode_documents(tok, texts)
    save_token_arrays(path, tokens)
    return tokens, "tokenized"


def _count(n: int) -> str:
    """1234 -> "1234", 4_200_000 -> "4.2M"."""
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.1f}{suffix}"
    return str(n)
