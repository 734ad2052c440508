"""What the objectives share to turn data into batches: text pipelines, per-row transforms,
process shares of a batch, and the tokenizer's special ids.

``build_task(cfg)`` asks the objective ``objective.kind`` names for its ``Task``
(``jaxformer.objectives.base``); ``text_task`` builds the task of every objective that reads
documents (causal, prefix-LM, masked-LM, span corruption) from a per-row transform.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxformer.config import Config
from jaxformer.data.errors import DataError
from jaxformer.data.images import is_image
from jaxformer.data.manifest import synthetic_manifest
from jaxformer.data.packing import stack_examples
from jaxformer.data.pipeline import DataPipeline
from jaxformer.data.speech_task import is_speech
from jaxformer.data.synthetic import is_synthetic
from jaxformer.data.tokenizer_kinds import get_kind, role_ids
from jaxformer.data.tokenizer_kinds import special_ids as _special_ids
from jaxformer.objectives.base import Batch, Log, Task
from jaxformer.objectives.registry import get_objective

RowTransform = Callable[[Batch, np.random.Generator], Batch]
# A sentinel step for validation rows, far from any training step.
_VAL_STEP = 2**31 - 1


def build_task(cfg: Config, tokenizer_path: Path, log: Log) -> Task:
    """The task of ``cfg``'s objective (its tokenizer loaded from ``tokenizer_path`` when that
    exists), with ``data_manifest`` set: the pipeline's, or a generated source's name."""
    task = get_objective(cfg.objective.kind).build_task(cfg, tokenizer_path, log)
    if task.data_manifest is None:
        if task.pipeline is not None:
            task.data_manifest = task.pipeline.data_manifest
        elif is_synthetic(cfg.data.source):
            task.data_manifest = synthetic_manifest(cfg.data.source)
    return task


def text_pipeline(cfg: Config, tokenizer_path: Path, log: Log, seq_len: int | None = None
                  ) -> DataPipeline:
    """The documents of ``data.source`` as packed rows of ``seq_len`` (default
    ``data.seq_len``), with a tokenizer of kind ``data.tokenizer`` that has the objective's
    special tokens."""
    d = cfg.data
    if is_synthetic(d.source):
        raise DataError(f"data.source={d.source!r} is a pair task; set objective.kind=seq2seq "
                        "(encoder-decoder) or prefix_lm (decoder)")
    if is_speech(d.source):
        raise DataError(f"data.source={d.source!r} holds audio, not text; set "
                        "objective.kind=transcription with an audio encoder "
                        "(model.audio_mels > 0, docs/speech.md)")
    if is_image(d.source):
        raise DataError(f"data.source={d.source!r} holds images, not text; set "
                        "objective.kind=classification with an image encoder "
                        "(model.patch_size > 0, docs/vision.md)")
    objective = get_objective(cfg.objective.kind)
    extra = (*get_kind(d.tokenizer).extra_tokens(objective.special_roles),
             *objective.special_tokens)
    return DataPipeline.create(
        source=d.source, seq_len=seq_len or d.seq_len, vocab_size=cfg.model.vocab_size,
        val_fraction=d.val_fraction, seed=d.seed, tokenizer_path=tokenizer_path,
        text_field=d.text_field, cache_dir=d.cache_dir or None, log=log,
        extra_special_tokens=extra, tokenizer_kind=d.tokenizer)


def text_task(cfg: Config, pipeline: DataPipeline, transform: RowTransform | None) -> Task:
    """Packed document rows, each passed through ``transform`` (None: as they are)."""
    return Task(
        name=cfg.objective.kind,
        train_batch=lambda step, b, seed, share=0, n=1: map_rows(
            pipeline.train_batch(step, b, seed, share, n).as_dict(), transform, seed, step,
            share_rows(b, share, n).start),
        val_batches=lambda b, n: (
            map_rows(batch.as_dict(), transform, cfg.train.seed, _VAL_STEP + k, 0)
            for k, batch in enumerate(pipeline.val_batches(b, n))),
        baseline_name="unigram", baseline=pipeline.unigram_baseline(),
        tokenizer=pipeline.tokenizer, pipeline=pipeline, data_manifest=pipeline.data_manifest)


def share_rows(batch_size: int, share: int, n_shares: int) -> range:
    """The global row indices of share ``share`` of ``n_shares`` of a batch."""
    local = batch_size // n_shares
    return range(share * local, (share + 1) * local)


def map_rows(batch: Batch, transform: RowTransform | None, seed: int, step: int,
             first_row: int) -> Batch:
    """Applies the per-row transform with the row's own generator (None: identity); row b
    of ``batch`` is row ``first_row + b`` of the global batch."""
    if transform is None:
        return batch
    rows = []
    for b in range(len(batch["inputs"])):
        row = {k: v[b] for k, v in batch.items()}
        out = transform(row, np.random.default_rng([seed, step, first_row + b]))
        if not row["loss_weights"].any():  # a padding row of a validation batch stays silent
            out["loss_weights"] = np.zeros_like(out["loss_weights"])
        rows.append(out)
    return stack_examples(rows)


def token_id(tokenizer: Tokenizer, token: str, kind: str) -> int:
    """The id of special token ``token``; a DataError when the tokenizer lacks it."""
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise DataError(f"objective.kind={kind!r} needs the special token {token!r}, which the "
                        "tokenizer lacks (a tokenizer trained for another objective?)")
    return tid


def special_ids(tokenizer: Tokenizer) -> list[int]:
    """Ids of the added special tokens (EOS, PAD, mask, sentinels, unknown)."""
    return _special_ids(tokenizer)


def role_token_ids(tokenizer: Tokenizer, role: str, kind: str) -> list[int]:
    """The ids of the tokenizer's ``role`` tokens (``tokenizer_kinds.MASK_ROLE``: [the mask
    token]; ``SENTINELS_ROLE``: the sentinels), named as its kind names them; a DataError
    naming objective ``kind`` when the tokenizer lacks them."""
    return role_ids(tokenizer, role, kind)
