"""Prefix LM (T5, Raffel et al. 2020; UL2, Tay et al. 2022) on a decoder-only model, as numpy
transforms of packed rows on the host.

Each document is split into a prefix, whose tokens see each other both ways, and a
continuation, predicted causally. The model takes the `prefix` marks (`DecoderLM(prefix=...)`)
and ands them with the document mask; here the loss is restricted to the predictions that the
bidirectional prefix does not give away.

Letters: T row length, Ls source length, Lt target length, L segment length, k split point
(prefix length) of a segment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxformer.config import Config
from jaxformer.data.packing import stack_examples
from jaxformer.data.synthetic import EOS_ID, PAD_ID, is_synthetic
from jaxformer.objectives.base import Batch, Log, Objective, Task
from jaxformer.objectives.masked_lm import segment_positions
from jaxformer.objectives.registry import register
from jaxformer.objectives.seq2seq import translation_task
from jaxformer.objectives.tasks import share_rows, text_pipeline, text_task


def check_prefix_config(min_frac: float, max_frac: float) -> None:
    """ValueError (one line) unless 0 < min_frac <= max_frac < 1."""
    if not 0.0 < min_frac <= max_frac < 1.0:
        raise ValueError(
            f"prefix fractions must satisfy 0 < min <= max < 1, got min {min_frac} and "
            f"max {max_frac}"
        )


def split_bounds(length: np.ndarray, min_frac: float, max_frac: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive split-point bounds (lo, hi), each like `length` (int64), for segment lengths.

    lo = ceil(min_frac * L), hi = floor(max_frac * L), both clipped to [1, L - 1] so that the
    prefix and the continuation are never empty; L = 1 gives (0, 0): no prefix. When the
    interval holds no integer (e.g. min == max and min * L not whole) the split is lo.
    """
    L = np.asarray(length, dtype=np.int64)
    # Rounded before ceil/floor so that e.g. 0.3 * 10 = 3.0000000000000004 still gives 3.
    lo = np.ceil(np.round(min_frac * L, 9)).astype(np.int64)
    hi = np.floor(np.round(max_frac * L, 9)).astype(np.int64)
    lo = np.clip(lo, 1, np.maximum(L - 1, 1))
    hi = np.clip(hi, 1, np.maximum(L - 1, 1))
    hi = np.maximum(hi, lo)
    none = L <= 1
    return np.where(none, 0, lo), np.where(none, 0, hi)


def prefix_example(
    inputs: np.ndarray,
    targets: np.ndarray,
    segment_ids: np.ndarray,
    positions: np.ndarray,
    loss_weights: np.ndarray,
    rng: np.random.Generator,
    *,
    min_prefix_frac: float = 0.25,
    max_prefix_frac: float = 0.75,
) -> dict[str, np.ndarray]:
    """Give every document segment of one packed row a random bidirectional prefix.

    inputs, targets, segment_ids, positions: [T] int and loss_weights: [T] float, one row of
    `packing.row_batch` (segment id 0 = padding). For each run of equal segment id > 0 of L
    tokens, a split point k is drawn uniformly from `split_bounds` (inclusive); the first k
    tokens of the run (by position within the run, not the `positions` field) form the prefix.

    Input j of a run predicts token j + 1. For j < k - 1 that target is itself a prefix token,
    which input j sees through the bidirectional prefix, so its loss weight is set to 0: only
    the predictions from the last prefix token on (j >= k - 1) keep their weight, i.e. the
    continuation tokens. Tokens, targets, segments and positions are unchanged.

    Returns the five input keys (copies; int32 / float32) plus "prefix" [T] int32, 1 on
    prefix tokens.
    """
    check_prefix_config(min_prefix_frac, max_prefix_frac)
    seg = np.asarray(segment_ids)
    T = len(seg)
    for name, a in (("inputs", inputs), ("targets", targets), ("positions", positions),
                    ("loss_weights", loss_weights)):
        if np.shape(a) != (T,):
            raise ValueError(f"{name} must have shape ({T},) like segment_ids, got {np.shape(a)}")

    offset = segment_positions(seg)  # [T] position of each token within its run
    run_of = np.cumsum(offset == 0) - 1  # [T] run index
    run_len = np.bincount(run_of, minlength=0) if T else np.zeros(0, np.int64)
    lo, hi = split_bounds(run_len, min_prefix_frac, max_prefix_frac)
    split = rng.integers(lo, hi + 1)  # [runs]; one draw per run, padding runs included
    real = seg[offset == 0] > 0
    split = np.where(real, split, 0)

    k = split[run_of]  # [T] split point of each token's run
    prefix = offset < k
    keep = offset >= k - 1  # for k = 0 (no prefix) every prediction is kept
    return {
        "inputs": np.asarray(inputs, dtype=np.int32).copy(),
        "targets": np.asarray(targets, dtype=np.int32).copy(),
        "segment_ids": seg.astype(np.int32, copy=True),
        "positions": np.asarray(positions, dtype=np.int32).copy(),
        "loss_weights": (np.asarray(loss_weights, dtype=np.float32) * keep).astype(np.float32),
        "prefix": prefix.astype(np.int32),
    }


def prefix_example_from_pair(source: np.ndarray, target: np.ndarray, seq_len: int, eos_id: int,
                             pad_id: int) -> dict[str, np.ndarray]:
    """One row for an input -> target pair: the source is the bidirectional prefix.

    source: [Ls] int, target: [Lt] int. As in T5's prefix-LM feature converter, each part ends
    with EOS, so the model sees where the source stops: the sequence is
    `source EOS target EOS` (Ls + Lt + 2 tokens), inputs its first Ls + Lt + 1 and targets its
    last Ls + Lt + 1, right-padded with pad_id to seq_len. The prefix is the source and its
    EOS (Ls + 1 tokens); the loss is on the Lt + 1 predictions of the target tokens and the
    final EOS. Padding has segment id 0, position 0, no prefix and no loss.

    Returns {"inputs", "targets", "segment_ids", "positions", "prefix"} [seq_len] int32 and
    "loss_weights" [seq_len] float32. ValueError if Ls + Lt + 1 > seq_len.
    """
    source = np.asarray(source)
    target = np.asarray(target)
    if source.ndim != 1 or target.ndim != 1:
        raise ValueError(
            f"source and target must be 1-D, got shapes {source.shape} and {target.shape}"
        )
    Ls, Lt = len(source), len(target)
    n = Ls + Lt + 1  # inputs used; the sequence has one more token (the last target)
    if n > seq_len:
        raise ValueError(
            f"source ({Ls} tokens) + target ({Lt}) + 2 EOS need {n} input positions, more "
            f"than the sequence length {seq_len}; truncate the pair or use a longer sequence"
        )
    seq = np.concatenate([source, [eos_id], target, [eos_id]]).astype(np.int32)
    inputs = np.full(seq_len, pad_id, dtype=np.int32)
    targets = np.full(seq_len, pad_id, dtype=np.int32)
    inputs[:n] = seq[:-1]
    targets[:n] = seq[1:]
    segment_ids = np.zeros(seq_len, dtype=np.int32)
    segment_ids[:n] = 1
    positions = np.zeros(seq_len, dtype=np.int32)
    positions[:n] = np.arange(n)
    prefix = np.zeros(seq_len, dtype=np.int32)
    prefix[: Ls + 1] = 1
    loss_weights = np.zeros(seq_len, dtype=np.float32)
    loss_weights[Ls:n] = 1.0  # inputs Ls (the source EOS) .. Ls + Lt predict target, EOS
    return {
        "inputs": inputs,
        "targets": targets,
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_weights": loss_weights,
        "prefix": prefix,
    }


def prefix_attention_mask(segment_ids: np.ndarray, prefix: np.ndarray) -> np.ndarray:
    """Reference prefix-LM attention mask of one row: [T, T] bool, [query t, key s].

    visible(t, s) = same segment and (s <= t or (prefix[t] and prefix[s])). segment_ids: [T]
    int, prefix: [T] int/bool. Matches `models.decoder.prefix_mask & nn.masks.segment_mask`.
    """
    seg = np.asarray(segment_ids)
    p = np.asarray(prefix).astype(bool)
    T = len(seg)
    causal = np.tril(np.ones((T, T), dtype=bool))
    return (seg[:, None] == seg[None, :]) & (causal | (p[:, None] & p[None, :]))



@register
class PrefixLM(Objective):
    """Documents split into a bidirectional prefix and a causal continuation; or, with a
    ``synthetic:<task>`` source, ``source EOS target EOS`` rows with the source as prefix."""

    name = "prefix_lm"
    arch = "decoder"

    def check(self, cfg: Config) -> None:
        check_prefix_config(cfg.objective.prefix_min, cfg.objective.prefix_max)

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        if is_synthetic(cfg.data.source):
            return _pair_task(cfg, log)
        o = cfg.objective

        def prefix(row: Batch, rng: np.random.Generator) -> Batch:
            return prefix_example(
                row["inputs"], row["targets"], row["segment_ids"], row["positions"],
                row["loss_weights"], rng, min_prefix_frac=o.prefix_min,
                max_prefix_frac=o.prefix_max)

        return text_task(cfg, text_pipeline(cfg, tokenizer_path, log), prefix)

    def logits(self, model: Any, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        return model(batch["inputs"], batch["positions"], batch["segment_ids"],
                     prefix=batch["prefix"], dropout_rng=dropout_rng)


def _pair_task(cfg: Config, log: Log) -> Task:
    """Input -> target pairs for a decoder: ``source EOS target EOS`` in one row, the source
    (and its EOS) the bidirectional prefix, the loss on the target."""
    task = translation_task(cfg, log)

    def row(src: np.ndarray) -> Batch:
        return prefix_example_from_pair(task.source_ids(src), task.target_ids(task.translate(src)),
                                        cfg.data.seq_len, EOS_ID, PAD_ID)

    def train_batch(step: int, b: int, seed: int, share: int = 0, n: int = 1) -> Batch:
        return stack_examples([row(task.sample(np.random.default_rng([seed, step, r]), False))
                               for r in share_rows(b, share, n)])

    def val_batches(b: int, n: int | None):  # noqa: ANN202 - a generator of batches
        sources = task.heldout_sources(b * (n or 16))
        for k in range(n or 16):
            yield stack_examples([row(s) for s in sources[k * b:(k + 1) * b]])

    return Task(name="prefix_lm", train_batch=train_batch, val_batches=val_batches,
                baseline_name="unigram", baseline=float("nan"))
