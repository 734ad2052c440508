"""The objective interface: one object per objective, asked by the trainer, evaluation and
sampling for everything that depends on what the model learns to predict.

An objective turns the run's data into batches (``build_task``), calls the model on a batch
(``logits``), checks its own config options (``check``) and names the tokenizer's extra special
tokens, the model architecture it trains, and how its runs are decoded (``sampling``, a
strategy of ``jaxformer.inference.SAMPLERS``) and evaluated by decoding (``decode_metrics``,
names in ``jaxformer.inference.DECODE_METRICS``). Register a new one with
``jaxformer.objectives.registry.register``; the trainer finds it by ``objective.kind``.

Batches are dicts of numpy arrays (letters: B batch, T decoder length, S encoder length,
V vocabulary, C classes):

    every objective  inputs, targets, loss_weights, segment_ids, positions   [B, T]
    prefix_lm        + prefix [B, T] (1 = token of its document's bidirectional prefix)
    permutation_lm   + order [B, T] (each token's rank in its document's factorisation order)
    encoder-decoder  + enc_inputs, enc_segment_ids, enc_positions            [B, S]
    transcription    + audio [B, N] float32, audio_mask [B, N // 160] (no enc_*)
    captioning       + pixels [B, H, W, C] float32 (the image prefix)
    classification   targets, loss_weights [B, 1] (one label per row)
    token_classification  targets [B, T] labels (not next tokens), loss_weights 0 unlabelled

Each row's randomness (masking, split points, noise spans) comes from
``default_rng([seed, step, row])``, so a row does not depend on the batch size of a process
or on how many processes share the batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
from tokenizers import Tokenizer

from jaxformer.config import Config
from jaxformer.data.captions import CaptionTask
from jaxformer.data.pipeline import DataPipeline
from jaxformer.data.speech_task import SpeechTask
from jaxformer.data.synthetic import SyntheticTranslation

Batch = dict[str, np.ndarray]
Log = Callable[[str], None]


@dataclasses.dataclass
class Task:
    """What the train loop needs from the data, whatever the objective."""

    name: str
    # (step, batch_size, seed, share, n_shares) -> rows [share * B/n, (share + 1) * B/n) of
    # the global batch of the step (one process's share; (0, 1): the whole batch)
    train_batch: Callable[[int, int, int, int, int], Batch]
    val_batches: Callable[[int, int | None], Iterator[Batch]]  # (batch_size, max_batches)
    baseline_name: str  # "unigram" (nats/token) or "majority class" (accuracy)
    baseline: float
    tokenizer: Tokenizer | None = None
    pipeline: DataPipeline | None = None  # the text pipeline behind LM objectives
    translation: SyntheticTranslation | None = None
    speech: SpeechTask | None = None  # a speech source's clips (objective.kind=transcription)
    captions: CaptionTask | None = None  # a caption source's images (objective.kind=captioning)
    # What the data source held (jaxformer.data.manifest; JSON-serializable), for a resumed run
    # to tell whether its data changed: ``manifest.describe_change(saved, task.data_manifest)``
    data_manifest: dict[str, Any] | None = None


class Objective:
    """The base of every objective; subclasses set the class attributes and ``build_task``."""

    name: ClassVar[str]  # the objective.kind value
    arch: ClassVar[str]  # the model.arch it trains
    special_tokens: ClassVar[tuple[str, ...]] = ()  # added to a new tokenizer after EOS, PAD
    # The special tokens it needs by role (tokenizer_kinds.MASK_ROLE, SENTINELS_ROLE), named as
    # the run's kind of tokenizer (data.tokenizer) names them and added after its own
    special_roles: ClassVar[tuple[str, ...]] = ()
    sampling: ClassVar[str | None] = None  # end-of-run samples: a jaxformer.inference.SAMPLERS key
    decode_metrics: ClassVar[tuple[str, ...]] = ()  # jaxformer.inference.DECODE_METRICS keys

    def check(self, cfg: Config) -> None:
        """Checks this objective's options in ``cfg``; raises ValueError with one line."""

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        """The run's data as batches (its tokenizer loaded from ``tokenizer_path`` when that
        file exists, trained and saved there otherwise)."""
        raise NotImplementedError

    def logits(self, model: Any, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        """-> logits [B, T, V] aligned with ``batch["targets"]``. The default is a language
        model's call over ``inputs`` (decoder, or an encoder's masked-LM head)."""
        return model(batch["inputs"], batch["positions"], batch["segment_ids"],
                     dropout_rng=dropout_rng)


def encoder_decoder_logits(model: Any, batch: dict[str, jax.Array],
                           dropout_rng: jax.Array | None = None) -> jax.Array:
    """An encoder-decoder's call: source ``enc_*`` [B, S], decoder ``inputs`` [B, T]
    -> [B, T, V]."""
    return model(batch["enc_inputs"], batch["inputs"], batch["enc_segment_ids"],
                 batch["segment_ids"], batch["enc_positions"], batch["positions"],
                 dropout_rng=dropout_rng)
