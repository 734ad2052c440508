"""Image captioning (PaLI, Chen et al. 2023; LLaVA, Liu et al. 2023): images of a caption
source (``data.source='caption:<name>'``, ``jaxformer.data.captions``) -> their descriptions,
for an image-prefix decoder (``model.arch='image_prefix'``). The loss is next-token
cross-entropy over the caption (the image is a prefix, never a target); the eval also decodes
greedy captions of the held-out images and reports their exact match (``caption_exact_match``,
higher is better)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxformer.config import Config
from jaxformer.data import captions
from jaxformer.data.errors import DataError
from jaxformer.objectives.base import Log, Objective, Task
from jaxformer.objectives.registry import register
from jaxformer.objectives.tasks import share_rows


@register
class Captioning(Objective):
    name = "captioning"
    arch = "image_prefix"
    decode_metrics = ("caption_exact_match",)

    def check(self, cfg: Config) -> None:
        m, d = cfg.model, cfg.data
        if not captions.is_caption(d.source):
            raise ValueError(f"objective.kind='captioning' reads a caption data.source "
                             f"({', '.join(captions.PREFIX + s for s in captions.SOURCES)}), "
                             f"got {d.source!r}")
        try:
            captions.CaptionTask.create(d.source, d.seq_len)
        except DataError as e:
            raise ValueError(str(e)) from None
        side = captions.SIDE
        if (m.image_size, m.image_channels) != (side, captions.CHANNELS):
            raise ValueError(f"data.source={d.source!r} holds {side}x{side} images of "
                             f"{captions.CHANNELS} channel: set model.image_size={side} and "
                             f"model.image_channels={captions.CHANNELS} (got {m.image_size} and "
                             f"{m.image_channels})")
        if m.vocab_size < captions.VOCAB_SIZE:
            raise ValueError(f"{d.source} captions need model.vocab_size >= "
                             f"{captions.VOCAB_SIZE} (PAD, BOS, EOS and "
                             f"{captions.VOCAB_SIZE - 3} words), got {m.vocab_size}")

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        d = cfg.data
        data = captions.CaptionTask.create(d.source, d.seq_len)
        log(f"data: {d.source}, {captions.SIDE}x{captions.SIDE} images of "
            f"{captions.MIN_DIGITS}-{captions.MAX_DIGITS} digits composed per step (word "
            f"vocabulary of {captions.VOCAB_SIZE}, no tokenizer)")
        return Task(name=self.name,
                    train_batch=lambda step, b, seed, share=0, n=1: data.train_batch(
                        step, b, seed, share_rows(b, share, n)),
                    val_batches=data.val_batches, baseline_name="unigram",
                    baseline=float("nan"), captions=data, data_manifest=data.manifest())

    def logits(self, model: Any, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        return model(batch["pixels"], batch["inputs"], batch["segment_ids"],
                     dropout_rng=dropout_rng)
