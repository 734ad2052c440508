"""Split documents, concatenate them into one token stream, and cut the stream into rows.

Documents are packed back to back (each followed by EOS) and cut into fixed-length rows with no
padding. A row can span several documents, so each row carries `segment_ids` and `positions`
for document-masked attention and per-document positions, and `loss_weights` that zero the
predictions crossing a document boundary.
"""

import dataclasses

import numpy as np

from jaxformer.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Batch:
    """A batch of B rows of T tokens; every field is a numpy array [B, T].

    inputs (int32): token ids fed to the model.
    targets (int32): the next token for each input (inputs shifted left by one).
    segment_ids (int32): 1-based id of the input token's document, renumbered within the row;
        0 is never used (reserved for padding), so attention masks as `seg_q == seg_k`.
    positions (int32): position of the input token within its document's part of the row.
    loss_weights (float32): 1.0 where input and target are in the same document, else 0.0.
    """

    inputs: np.ndarray
    targets: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray
    loss_weights: np.ndarray

    def as_dict(self) -> dict[str, np.ndarray]:
        """The fields by name (no copies, unlike `dataclasses.asdict`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class TokenStream:
    """Documents concatenated, each followed by EOS.

    tokens: [N] int32 token ids.
    doc_ids: [N] int32, the index (in stream order) of the document each token belongs to;
        a document's trailing EOS carries that document's id.
    """

    tokens: np.ndarray
    doc_ids: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split document indices into (train_idx, val_idx), both sorted int64 arrays.

    Splitting by document, not by token, keeps validation text unseen in training. The split
    is a seeded permutation, so it is the same on every run (and every process) for a seed.
    With val_fraction > 0 there is at least 1 validation and 1 training document.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {val_fraction}")
    if n_docs < 1 or (n_docs < 2 and val_fraction > 0):
        raise DataError(
            f"need at least 2 documents to split into training and validation, got {n_docs}; "
            "split the text into several files (or JSON lines), or set the validation "
            "fraction to 0"
        )
    perm = np.random.default_rng(seed).permutation(n_docs)
    n_val = 0
    if val_fraction > 0:
        n_val = min(n_docs - 1, max(1, round(n_docs * val_fraction)))
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def make_stream(docs: list[np.ndarray], eos_id: int, order_seed: int) -> TokenStream:
    """Concatenate `docs` (each [n_i] int) in a seeded random order, each followed by EOS.

    Shuffling the document order mixes sources (e.g. files from different packages) so that
    consecutive rows are not all from the same place. Returns a stream of N = sum(n_i + 1).
    """
    order = np.random.default_rng(order_seed).permutation(len(docs))
    ordered = [docs[i] for i in order]
    lengths = np.fromiter((len(d) + 1 for d in ordered), dtype=np.int64, count=len(ordered))
    eos_at = np.cumsum(lengths) - 1
    tokens = np.empty(int(lengths.sum()), dtype=np.int32)
    is_eos = np.zeros(len(tokens), dtype=bool)
    is_eos[eos_at] = True
    if ordered:
        tokens[~is_eos] = np.concatenate(ordered)
    tokens[eos_at] = eos_id
    doc_ids = np.repeat(np.arange(len(ordered), dtype=np.int32), lengths)
    return TokenStream(tokens=tokens, doc_ids=doc_ids)


def num_rows(n_tokens: int, seq_len: int) -> int:
    """Rows of `seq_len` inputs in a stream of `n_tokens`: each row needs one extra target."""
    return max(0, (n_tokens - 1) // seq_len)


def row_batch(stream: TokenStream, rows: np.ndarray, seq_len: int) -> Batch:
    """The batch [len(rows), seq_len] of the given row indices.

    Row r is the window stream[r*T : r*T + T + 1]: inputs are its first T tokens and targets its
    last T, so consecutive rows share one token and every next-token pair of the stream is in
    exactly one row.
    """
    T = seq_len
    rows = np.asarray(rows, dtype=np.int64)
    n = num_rows(len(stream), T)
    if rows.ndim != 1 or (rows.size and (rows.min() < 0 or rows.max() >= n)):
        raise IndexError(f"row indices must be a 1-D array in [0, {n}), got {rows}")
    window = rows[:, None] * T + np.arange(T + 1)  # [B, T+1] stream positions
    tokens = stream.tokens[window]
    docs = stream.doc_ids[window]
    in_docs = docs[:, :-1]

    # A segment starts at the row start and wherever the input's document changes.
    starts = np.ones((len(rows), T), dtype=bool)
    starts[:, 1:] = in_docs[:, 1:] != in_docs[:, :-1]
    segment_ids = np.cumsum(starts, axis=1, dtype=np.int32)
    col = np.arange(T, dtype=np.int32)
    # Column where the current segment started: running max of the start columns.
    segment_start = np.maximum.accumulate(np.where(starts, col, 0), axis=1)

    return Batch(
        inputs=np.ascontiguousarray(tokens[:, :-1]),
        targets=np.ascontiguousarray(tokens[:, 1:]),
        segment_ids=segment_ids,
        positions=(col - segment_start).astype(np.int32),
        loss_weights=(in_docs == docs[:, 1:]).astype(np.float32),
    )


def pad_batch(batch: Batch, batch_size: int, pad_token: int) -> Batch:
    """Append rows with zero loss weight so that `batch` has exactly `batch_size` rows.

    Padded rows get segment id 1 (not 0) so that their attention rows are not fully masked,
    which would give NaN softmaxes even though their loss weight is 0.
    """
    n_pad = batch_size - len(batch.inputs)
    if n_pad < 0:
        raise ValueError(f"batch has {len(batch.inputs)} rows, more than {batch_size}")
    if n_pad == 0:
        return batch
    T = batch.inputs.shape[1]
    pad = Batch(
        inputs=np.full((n_pad, T), pad_token, dtype=np.int32),
        targets=np.full((n_pad, T), pad_token, dtype=np.int32),
        segment_ids=np.ones((n_pad, T), dtype=np.int32),
        positions=np.broadcast_to(np.arange(T, dtype=np.int32), (n_pad, T)),
        loss_weights=np.zeros((n_pad, T), dtype=np.float32),
    )
    return Batch(
        **{
            name: np.concatenate([value, getattr(pad, name)])
            for name, value in batch.as_dict().items()
        }
    )


@dataclasses.dataclass(frozen=True)
class PackedRows:
    """A token stream cut into rows of `seq_len`; DataError if it holds not even one row."""

    stream: TokenStream
    seq_len: int
    name: str = "data"

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise DataError(f"sequence length must be at least 1, got {self.seq_len}")
        if self.n_rows == 0:
            raise DataError(
                f"sequence length {self.seq_len} is longer than the {self.name} data: "
                f"{len(self.stream)} tokens, and one row needs {self.seq_len + 1}; "
                "use a shorter sequence length or more data"
            )

    @property
    def n_rows(self) -> int:
        return num_rows(len(self.stream), self.seq_len)

    def batch(self, rows: np.ndarray) -> Batch:
        """`row_batch` for these rows: arrays [len(rows), seq_len]."""
        return row_batch(self.stream, rows, self.seq_len)


def stack_examples(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-example dicts of [L] arrays (same keys) -> one dict of [B, L] arrays."""
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


def decoder_rows(id_lists: list[np.ndarray] | list[list[int]], seq_len: int, *, pad: int,
                 bos: int, eos: int, texts: list[str] | None = None) -> Batch:
    """Target sequences (ids without BOS or EOS) -> the decoder half of a seq2seq batch, one
    sequence per row ([B, L] each): inputs BOS + ids, targets ids + EOS, loss weights and
    segment ids 1 on those n + 1 positions, positions 0..L-1, ``pad`` after. A DataError
    naming the sequence (``texts[r]`` when given) when n + 1 > ``seq_len``."""
    b = len(id_lists)
    out = {"inputs": np.full((b, seq_len), pad, np.int32),
           "targets": np.full((b, seq_len), pad, np.int32),
           "loss_weights": np.zeros((b, seq_len), np.float32),
           "segment_ids": np.zeros((b, seq_len), np.int32),
           "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32),
                                        (b, seq_len)).copy()}
    for r, ids in enumerate(id_lists):
        n = len(ids) + 1
        if n > seq_len:
            what = repr(texts[r]) if texts is not None else f"row {r}"
            raise DataError(f"target {what} takes {n} decoder tokens, more than "
                            f"data.seq_len={seq_len}")
        out["inputs"][r, :n] = [bos, *ids]
        out["targets"][r, :n] = [*ids, eos]
        out["loss_weights"][r, :n] = 1.0
        out["segment_ids"][r, :n] = 1
    return out
