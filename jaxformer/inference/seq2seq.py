"""Exact match of greedy translations: an encoder-decoder's decode metric (``Seq2Seq``)."""

from __future__ import annotations

from typing import Any

from jaxformer.config import Config
from jaxformer.data.synthetic import EOS_ID, PAD_ID
from jaxformer.inference.families import family_for
from jaxformer.inference.generate import Generator
from jaxformer.objectives.base import Task


def exact_match(cfg: Config, graphdef: Any, params: Any, task: Task) -> float:
    """Share of held-out sources whose greedy translation equals the reference exactly, its
    end token included (``eval.batches`` batches, 16 when that is 0)."""
    data = task.translation
    assert data is not None, "exact match decodes a synthetic translation task"
    generator = Generator(family_for(cfg, graphdef, decoder_start_id=PAD_ID), params,
                          pad_id=PAD_ID)
    hits = total = 0
    for batch in data.val_batches(cfg.train.batch_size, cfg.eval.batches or 16):
        sources = [row[seg > 0].tolist() for row, seg in zip(
            batch["enc_inputs"], batch["enc_segment_ids"], strict=True)]
        gens = generator.generate(sources, data.seq_len, stop_tokens=[EOS_ID])
        for gen, targets, weights in zip(gens, batch["targets"], batch["loss_weights"],
                                         strict=True):
            want = targets[weights > 0].tolist()  # the translation, then its EOS
            hits += gen.finish_reason == "stop" and gen.tokens + [EOS_ID] == want
            total += 1
    return hits / max(total, 1)
