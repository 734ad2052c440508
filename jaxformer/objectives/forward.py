"""One forward pass for every objective: the batch's keys say how the model is called.

Letters: B batch, T (decoder) length, S encoder length, V vocabulary, C classes.
"""

from __future__ import annotations

from typing import Any

import jax

Batch = dict[str, jax.Array]


def objective_logits(model: Any, batch: Batch, dropout_rng: jax.Array | None = None
                     ) -> jax.Array:
    """-> logits [B, T, V] aligned with batch["targets"] ([B, 1, C] for classification)."""
    if "enc_inputs" in batch:  # encoder-decoder: span corruption, seq2seq
        return model(batch["enc_inputs"], batch["inputs"], batch["enc_segment_ids"],
                     batch["segment_ids"], batch["enc_positions"], batch["positions"],
                     dropout_rng=dropout_rng)
    if getattr(model.cfg, "num_labels", 0) > 0 and model.cfg.arch == "encoder":
        logits = model.classify(batch["inputs"], batch["positions"], batch["segment_ids"],
                                dropout_rng=dropout_rng)
        return logits[:, None, :]
    if "prefix" in batch:
        return model(batch["inputs"], batch["positions"], batch["segment_ids"],
                     prefix=batch["prefix"], dropout_rng=dropout_rng)
    return model(batch["inputs"], batch["positions"], batch["segment_ids"],
                 dropout_rng=dropout_rng)
