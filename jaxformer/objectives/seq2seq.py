"""Sequence to sequence (Vaswani et al. 2017): generated input -> target pairs
(``data.source=synthetic:<task>``) for an encoder-decoder, scored also by exact match of the
greedy translation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxformer.config import Config
from jaxformer.data.errors import DataError
from jaxformer.data.synthetic import SyntheticTranslation, is_synthetic, vocab_size
from jaxformer.objectives.base import Log, Objective, Task, encoder_decoder_logits
from jaxformer.objectives.registry import register
from jaxformer.objectives.tasks import share_rows


def translation_task(cfg: Config, log: Log) -> SyntheticTranslation:
    """The synthetic pair task ``data.source`` names (a DataError if it names none)."""
    if not is_synthetic(cfg.data.source):
        raise DataError(f"objective.kind={cfg.objective.kind!r} reads synthetic:<task> "
                        f"sources; got data.source={cfg.data.source!r}")
    task = SyntheticTranslation.create(cfg.data.source, cfg.data.seq_len)
    if cfg.model.vocab_size < vocab_size():
        raise DataError(f"{cfg.data.source} needs model.vocab_size >= {vocab_size()}")
    log(f"data: {cfg.data.source}, generated per step (no tokenizer)")
    return task


@register
class Seq2Seq(Objective):
    name = "seq2seq"
    arch = "encoder_decoder"
    decode_metrics = ("exact_match",)

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        task = translation_task(cfg, log)
        return Task(name=self.name,
                    train_batch=lambda step, b, seed, share=0, n=1: task.train_batch(
                        step, b, seed, share_rows(b, share, n)),
                    val_batches=lambda b, n: task.val_batches(b, n or 16),
                    baseline_name="unigram", baseline=float("nan"), translation=task)

    def logits(self, model: Any, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        return encoder_decoder_logits(model, batch, dropout_rng)
