"""Transcribing audio with a speech run (``model.audio_mels > 0``): greedy or beam decoding
through the common generation API (``Generator``, ``beam_search`` with the
``AudioSeq2SeqFamily``), the held-out character error rate (the ``cer`` decode metric), and the
audio inputs of ``jaxformer sample --audio``.

``--audio`` takes a 16-bit PCM WAV file (mono, or the mean of its channels) at the model's
``model.audio_sample_rate``, or ``heldout:K``: clip K of the run's held-out set (its
reference transcript is printed beside the model's).
"""

from __future__ import annotations

import wave
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxformer.config import Config
from jaxformer.data import speech, speech_task
from jaxformer.errors import UserError
from jaxformer.inference.beam_search import best_sequences
from jaxformer.inference.families import Family, family_for
from jaxformer.inference.generate import Generator
from jaxformer.nn.spectrogram import check_sample_rate
from jaxformer.objectives.base import Task

HELDOUT = "heldout:"


def transcribe(family: Family, params: Any, waves: Sequence[np.ndarray], max_chars: int, *,
               num_beams: int = 1, length_penalty: float = 1.0,
               generator: Generator | None = None) -> list[str]:
    """Waves [n] float32 (any lengths) -> their transcripts: greedy (``num_beams`` 1) or the
    best beam of a beam search; at most ``max_chars`` characters each. ``generator``: a
    greedy ``Generator`` of ``family`` to reuse (its compiled loop) across calls."""
    rows = best_sequences(family, params, waves, max_chars + 1, eos_id=speech.EOS_ID,
                          pad_id=speech.PAD_ID, num_beams=num_beams,
                          length_penalty=length_penalty, generator=generator)
    return [speech.decode_text(r) for r in rows]


def speech_family(cfg: Config, graphdef: Any) -> Family:
    return family_for(cfg, graphdef, decoder_start_id=speech.BOS_ID)


def heldout_transcripts(cfg: Config, graphdef: Any, params: Any, data: speech_task.SpeechTask,
                        n_clips: int, num_beams: int = 1) -> tuple[list[str], list[str]]:
    """-> (hypotheses, references) of the first ``n_clips`` held-out clips, batch by batch."""
    family = speech_family(cfg, graphdef)
    generator = Generator(family, params, pad_id=speech.PAD_ID) if num_beams == 1 else None
    hyps: list[str] = []
    refs: list[str] = []
    batch = cfg.train.batch_size
    for start in range(0, n_clips, batch):
        clips = [data.heldout(k) for k in range(start, min(start + batch, n_clips))]
        hyps += transcribe(family, params, [w for w, _ in clips], data.spec.max_chars,
                           num_beams=num_beams, generator=generator)
        refs += [t for _, t in clips]
    return hyps, refs


def character_error_rate(cfg: Config, graphdef: Any, params: Any, task: Task) -> float:
    """The ``cer`` decode metric: the character error rate (lower is better) of greedy
    transcripts of the held-out clips the eval reads (``eval.batches`` batches; 0: all
    ``speech_task.HELDOUT_CLIPS``)."""
    data = task.speech
    assert data is not None, "the character error rate decodes a speech task"
    n = (cfg.eval.batches * cfg.train.batch_size if cfg.eval.batches
         else speech_task.HELDOUT_CLIPS)
    hyps, refs = heldout_transcripts(cfg, graphdef, params, data, n)
    return speech.character_error_rate(hyps, refs)


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV file -> (wave [n] float32 in [-1, 1), sample rate); a UserError for
    what it cannot read."""
    try:
        with wave.open(str(path), "rb") as f:
            if f.getsampwidth() != 2:
                raise UserError(f"{path}: {8 * f.getsampwidth()}-bit samples; --audio reads "
                                "16-bit PCM WAV")
            rate, channels = f.getframerate(), f.getnchannels()
            data = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    except (OSError, EOFError, wave.Error) as e:
        raise UserError(f"cannot read {path} as a WAV file: {e}") from None
    audio = data.reshape(-1, channels).astype(np.float32).mean(axis=1) / 32768.0
    return audio, rate


def write_wav(path: Path, audio: np.ndarray, sample_rate: int) -> None:
    """A wave [n] float in [-1, 1] -> a mono 16-bit PCM WAV file."""
    pcm = np.clip(np.round(np.asarray(audio) * 32768.0), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(sample_rate)
        f.writeframes(pcm.tobytes())


def audio_inputs(cfg: Config, specs: Sequence[str]) -> list[tuple[np.ndarray, str | None]]:
    """``--audio`` values -> [(wave, reference transcript or None)]: WAV files (checked
    against ``model.audio_sample_rate``) or ``heldout:K`` clips of the run's data source."""
    out: list[tuple[np.ndarray, str | None]] = []
    for spec in specs:
        if spec.startswith(HELDOUT):
            k = spec[len(HELDOUT):]
            if not k.isdigit():
                raise UserError(f"--audio {spec!r}: expected heldout:K with K a clip index >= 0")
            d = cfg.data
            data = speech_task.SpeechTask.create(d.source, d.sample_rate, d.clip_seconds,
                                                 d.seq_len)
            out.append(data.heldout(int(k)))
            continue
        audio, rate = read_wav(Path(spec))
        try:
            check_sample_rate(cfg.model.audio_sample_rate, rate)
        except ValueError as e:
            raise UserError(f"--audio {spec}: {e} (model.audio_sample_rate); resample it "
                            "first") from None
        out.append((audio, None))
    return out
