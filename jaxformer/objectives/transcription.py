"""Speech recognition (Whisper, Radford et al. 2022): audio clips of a speech source
(``data.source='speech:<name>'``, ``jaxformer.data.speech_task``) -> their transcripts, for an
encoder-decoder with an audio encoder (``model.audio_mels > 0``). The seq2seq objective with
audio in place of the source tokens: the same decoder layout and loss; evaluated also by the
character error rate of greedy transcripts (``cer``, lower is better)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax

from jaxformer.config import Config
from jaxformer.data import speech, speech_task
from jaxformer.data.errors import DataError
from jaxformer.data.manifest import synthetic_manifest
from jaxformer.objectives.base import Log, Task
from jaxformer.objectives.registry import register
from jaxformer.objectives.seq2seq import Seq2Seq
from jaxformer.objectives.tasks import share_rows


@register
class Transcription(Seq2Seq):
    name = "transcription"
    arch = "encoder_decoder"
    decode_metrics = ("cer",)

    def check(self, cfg: Config) -> None:
        m, d = cfg.model, cfg.data
        if m.audio_mels <= 0:
            raise ValueError("objective.kind='transcription' reads audio: it needs an audio "
                             "encoder (model.audio_mels > 0, docs/speech.md)")
        if not speech_task.is_speech(d.source):
            names = ", ".join(speech_task.PREFIX + s for s in speech_task.SOURCES)
            raise ValueError(f"objective.kind='transcription' reads a speech data.source "
                             f"({names}), got {d.source!r}")
        if m.vocab_size < speech.VOCAB_SIZE:
            raise ValueError(f"{d.source} transcripts need model.vocab_size >= "
                             f"{speech.VOCAB_SIZE} (PAD, BOS, EOS and {len(speech.CHARS)} "
                             f"characters), got {m.vocab_size}")
        try:
            speech_task.check(d.source, d.sample_rate, d.clip_seconds, d.seq_len)
        except DataError as e:
            raise ValueError(str(e)) from None

    def build_task(self, cfg: Config, tokenizer_path: Path, log: Log) -> Task:
        d = cfg.data
        data = speech_task.SpeechTask.create(d.source, d.sample_rate, d.clip_seconds,
                                             d.seq_len)
        log(f"data: {d.source}, clips of up to {d.clip_seconds} s at {d.sample_rate} Hz, "
            f"generated per step (character vocabulary, no tokenizer)")
        return Task(name=self.name,
                    train_batch=lambda step, b, seed, share=0, n=1: data.train_batch(
                        step, b, seed, share_rows(b, share, n)),
                    val_batches=data.val_batches, baseline_name="unigram",
                    baseline=float("nan"), speech=data,
                    data_manifest=synthetic_manifest(d.source))

    def logits(self, model: Any, batch: dict[str, jax.Array],
               dropout_rng: jax.Array | None = None) -> jax.Array:
        return model.audio_logits(batch["audio"], batch["audio_mask"], batch["inputs"],
                                  batch["segment_ids"], batch["positions"],
                                  dropout_rng=dropout_rng)
