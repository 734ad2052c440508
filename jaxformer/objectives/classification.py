"""Sequence classification (BERT fine-tuning): one label per row from a pooled encoder.

The data: which stdlib package a snippet comes from (``jaxformer.data.classification``, any
text ``data.source`` trains the tokenizer), a Long Range Arena-style task
(``data.source=lra:<task>``, ``jaxformer.data.lra``) with its own fixed vocabulary, or images
(``data.source=image:<name>``, ``jaxformer.data.images``) for a Vision Transformer
(``model.patch_size > 0``), whose batches hold ``pixels`` [B, H, W, C] instead of tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxformer.config import Config
from jaxformer.data import images, lra
from jaxformer.data.classification import PackageSnippets
from jaxformer.data.errors import DataError
from jaxformer.data.manifest import Manifest, synthetic_manifest
from jaxformer.objectives.base import Log, Objective, Task
from jaxformer.objectives.registry import register
from jaxformer.objectives.tasks import share_rows, text_pipeline


@register
class Classification(Objective):
    name = "classification"
    arch = "encoder"

    def check(self, cfg: Config) -> None:
        if cfg.model.num_labels < 2:
            raise ValueError("objective.kind='classification' needs model.num_labels >= 2")
        if cfg.model.two_tower and not lra.is_pair_task(cfg.data.source):
            raise ValueError(f"model.two_tower=true classifies pairs of documents; "
                             f"data.source={cfg.data.source!r} has single sequences (the pair "
                             f"task: data.source='lra:retrieval')")
        m, source = cfg.model, cfg.data.source
        if images.is_image(source) and m.patch_size <= 0:
            raise ValueError(f"data.source={source!r} holds images: it needs an image encoder "
                             "(model.patch_size > 0, docs/vision.md)")
        if m.patch_size > 0 and not images.is_image(source):
            names = ", ".join(images.PREFIX + n for n in images.DATASETS)
            raise ValueError(f"model.patch_size={m.patch_size} (an image encoder) needs an "
                             f"image data.source ({names}), got {source!r}")
        try:
            if lra.is_lra(source):
                lra.check(source, cfg.data.seq_len, m.vocab_size, m.num_labels, m.two_tower)
            elif images.is_image(source):
                images.check(source, m.image_size, m.image_channels, m.num_labels)
        except DataError as e:
            raise ValueError(str(e)) from None

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        if lra.is_lra(cfg.data.source):
            return _lra_task(self.name, cfg, log)
        if images.is_image(cfg.data.source):
            return _image_task(self.name, cfg, log)
        pipeline = text_pipeline(cfg, tokenizer_path, log)
        data = PackageSnippets.create(pipeline.tokenizer, cfg.model.num_labels,
                                      cfg.data.seq_len, seed=cfg.data.seed)
        log(f"classification: which stdlib package a snippet comes from: "
            f"{', '.join(data.classes)}")
        return Task(name=self.name,
                    train_batch=lambda step, b, seed, share=0, n=1: data.train_batch(
                        step, b, seed, share_rows(b, share, n)),
                    val_batches=lambda b, n: data.val_batches(b, n or 16),
                    baseline_name="majority class", baseline=1.0 / len(data.classes),
                    tokenizer=pipeline.tokenizer, pipeline=pipeline)

    def logits(self, model: Any, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        """-> [B, 1, C]: the pooled classifier's logits, aligned with targets [B, 1]."""
        if model.cfg.patch_size > 0:  # a Vision Transformer: the batch holds pixels
            return model.classify_image(batch["pixels"], dropout_rng=dropout_rng)[:, None, :]
        classify = model.classify_pair if model.cfg.two_tower else model.classify
        logits = classify(batch["inputs"], batch["positions"], batch["segment_ids"],
                          dropout_rng=dropout_rng)
        return logits[:, None, :]


def _lra_task(name: str, cfg: Config, log: Log) -> Task:
    """A generated LRA-style task: no tokenizer, batches from ``jaxformer.data.lra``."""
    data = lra.create(cfg.data.source, cfg.data.seq_len, cfg.model.vocab_size,
                      cfg.model.num_labels, cfg.model.two_tower)
    log(f"data: {cfg.data.source}, {data.num_classes} classes, {data.vocab_size} token ids, "
        "generated per step (no tokenizer)")
    return _generated_task(name, cfg, data, synthetic_manifest(cfg.data.source))


def _image_task(name: str, cfg: Config, log: Log) -> Task:
    """Images and their labels for a Vision Transformer: no tokenizer, batches of pixels
    from ``jaxformer.data.images``."""
    m = cfg.model
    data = images.create(cfg.data.source, m.image_size, m.image_channels, m.num_labels,
                         shift=cfg.data.image_shift)
    log(f"data: {cfg.data.source}, {len(data.train_labels)} training and "
        f"{len(data.heldout_labels)} held-out images of {m.image_size}x{m.image_size}x"
        f"{m.image_channels}, {data.num_classes} classes; {m.image_tokens} tokens per image")
    return _generated_task(name, cfg, data, data.manifest)


def _generated_task(name: str, cfg: Config, data: Any, manifest: Manifest) -> Task:
    """The Task of a tokenizer-free source (an LRA task or an image set): its
    step-indexed training batches, fixed held-out batches and majority-class baseline."""
    return Task(name=name,
                train_batch=lambda step, b, seed, share=0, n=1: data.train_batch(
                    step, b, seed, share_rows(b, share, n)),
                val_batches=lambda b, n: data.val_batches(b, n),
                baseline_name="majority class",
                baseline=data.majority_baseline(cfg.train.batch_size, cfg.eval.batches),
                data_manifest=manifest)
