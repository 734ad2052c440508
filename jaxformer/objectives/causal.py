"""Causal language modelling (GPT): predict every next token of packed documents; with
``model.mtp_heads`` > 0 also the tokens further ahead (multi-token prediction)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxformer.config import Config
from jaxformer.nn.moe_stats import record
from jaxformer.objectives.base import Log, Objective, Task
from jaxformer.objectives.loss import MTP_SUMS, mtp_loss_sums
from jaxformer.objectives.registry import register
from jaxformer.objectives.tasks import text_pipeline, text_task


@register
class CausalLM(Objective):
    name = "causal"
    arch = "decoder"
    sampling = "continuation"

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        return text_task(cfg, text_pipeline(cfg, tokenizer_path, log), None)

    def logits(self, model: Any, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        """The next-token logits [B, T, V]. A model with MTP modules also computes theirs and,
        under ``nnx.capture`` (the train and eval steps), records ``mtp_loss_sums`` on the
        model as the intermediate ``MTP_SUMS``, which the step adds to the loss with
        ``objective.mtp_weight`` (``jaxformer.train.step.make_loss_sums``). Outside a capture
        (scoring, analysis) nothing would read them: the MTP modules do not run."""
        mtp = getattr(getattr(model, "cfg", None), "mtp_heads", 0)
        if not mtp or not hasattr(model, "__captures__"):  # as moe_stats.record tells
            return super().logits(model, batch, dropout_rng)
        logits, mtp_logits = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                                   dropout_rng=dropout_rng, return_mtp=True)
        record(model, MTP_SUMS, mtp_loss_sums(mtp_logits, batch["targets"],
                                              batch["loss_weights"], batch["segment_ids"]))
        return logits
