"""Permutation language modelling (XLNet, Yang et al. 2019) as a numpy transform of packed rows
on the host, for the two-stream model ``model.arch='xlnet'`` (``jaxformer.models.xlnet``).

Each document of a packed row (a run of equal segment id > 0) gets its own factorisation
order z, a uniformly random permutation of its L tokens, drawn from the row's generator
``default_rng([seed, step, row])``: a row is a pure function of (seed, step, row), whatever
the batch size or the number of processes. The row carries it as ``order`` [T], each token's
rank in z (0 = first). Attention never crosses documents (the model ands the segment mask),
so the order is a permutation within each document, as if each were its own sequence.

Partial prediction: only the last ceil(L / K) tokens of each order (``objective.partial_k``
= K; XLNet used K = 6 for its large model and 7 for its base ablations) carry a loss; the rest
are context. ceil keeps at least one target per document, a one-token document included (its
query stream sees no content and predicts from its position alone). K = 1 predicts every
token, the first of each order from no context.

The target of token t is token t itself (its query stream never sees its content):
``targets = inputs``. The packed rows' next-token targets and weights are not used.

Letters: T row length, L document (run) length.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxformer.config import Config
from jaxformer.models.xlnet import check_xlnet_config
from jaxformer.objectives.base import Batch, Log, Objective, Task
from jaxformer.objectives.masked_lm import segment_positions
from jaxformer.objectives.registry import register
from jaxformer.objectives.tasks import text_pipeline, text_task


def check_permutation_config(partial_k: int) -> None:
    """ValueError (one line) unless K >= 1."""
    if partial_k < 1:
        raise ValueError(f"objective.partial_k must be >= 1 (predict the last 1/K of each "
                         f"factorisation order; XLNet used 6 or 7), got {partial_k}")


def n_predicted(length: int, partial_k: int) -> int:
    """Tokens predicted in a document of ``length`` tokens: ceil(length / K) (0 for 0)."""
    return math.ceil(length / partial_k)


def permutation_example(inputs: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray,
                        rng: np.random.Generator, *, partial_k: int = 6) -> dict[str, np.ndarray]:
    """One packed row -> its permutation-LM example.

    inputs, segment_ids, positions: [T] int, one row of ``packing.row_batch`` (segment id 0:
    padding). For each run of equal segment id > 0 of L tokens, a permutation z of its offsets
    is drawn (``rng.permutation(L)``, one draw per run, left to right); ``order`` holds each
    token's rank in z. Padding keeps the identity order and no loss.

    Returns "inputs", "targets" (= inputs), "segment_ids", "positions", "order" [T] int32 and
    "loss_weights" [T] float32: 1 on the last ceil(L / K) tokens of each order.
    """
    check_permutation_config(partial_k)
    seg = np.asarray(segment_ids)
    T = len(seg)
    for name, a in (("inputs", inputs), ("positions", positions)):
        if np.shape(a) != (T,):
            raise ValueError(f"{name} must have shape ({T},) like segment_ids, got {np.shape(a)}")
    offset = segment_positions(seg)  # [T] each token's offset within its run
    order = offset.astype(np.int32).copy()
    weights = np.zeros(T, np.float32)
    starts = np.flatnonzero(offset == 0)
    for start, stop in zip(starts, [*starts[1:], T], strict=True):
        if seg[start] == 0:
            continue
        L = stop - start
        z = rng.permutation(L)  # z[j]: the offset of the j-th token of the order
        rank = np.empty(L, np.int32)
        rank[z] = np.arange(L, dtype=np.int32)
        order[start:stop] = rank
        weights[start:stop] = rank >= L - n_predicted(L, partial_k)
    tokens = np.asarray(inputs, dtype=np.int32)
    return {
        "inputs": tokens.copy(),
        "targets": tokens.copy(),
        "segment_ids": seg.astype(np.int32, copy=True),
        "positions": np.asarray(positions, dtype=np.int32).copy(),
        "order": order,
        "loss_weights": weights,
    }


@register
class PermutationLM(Objective):
    """XLNet's permutation LM: documents in sampled factorisation orders, two-stream model,
    loss on the last 1/K of each order."""

    name = "permutation_lm"
    arch = "xlnet"

    def check(self, cfg: Config) -> None:
        check_permutation_config(cfg.objective.partial_k)
        check_xlnet_config(cfg.model)

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        k = cfg.objective.partial_k

        def permute(row: Batch, rng: np.random.Generator) -> Batch:
            return permutation_example(row["inputs"], row["segment_ids"], row["positions"],
                                       rng, partial_k=k)

        return text_task(cfg, text_pipeline(cfg, tokenizer_path, log), permute)

    def logits(self, model: Any, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        """The query stream's logits [B, T, V]: row t predicts ``inputs[t]``."""
        return model(batch["inputs"], batch["positions"], batch["segment_ids"],
                     order=batch["order"], dropout_rng=dropout_rng)
