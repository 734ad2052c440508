"""Speech recognition as a user runs it: ``experiments/speech_tiny.py`` (touch-tone dialling)
shrunk, trained through ``jaxformer.train.loop.train``: it learns (held-out character error
rate of greedy transcripts), resumes bitwise, ``jaxformer sample --audio`` transcribes WAV and
held-out clips (greedy and beam), and bad input is a one-line config error (through the CLI
too)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxformer import config as config_lib
from jaxformer.data.speech_task import SpeechTask
from jaxformer.errors import UserError
from jaxformer.inference.sample_command import SampleOptions, sample
from jaxformer.inference.speech import read_wav, write_wav
from jaxformer.train.loop import train
from tests.optimized import train_optimized

EXPERIMENT = Path(__file__).resolve().parents[2] / "experiments" / "speech_tiny.py"


def _cfg(*overrides: str) -> config_lib.Config:
    return config_lib.apply_overrides(config_lib.load_experiment(EXPERIMENT), list(overrides))


RESUME = ("model.d_model=32", "model.d_ff=64", "model.n_layers=1", "model.n_decoder_layers=1",
          "train.batch_size=4", "train.steps=4", "train.warmup_steps=1", "eval.every=4",
          "eval.batches=1", "log.every=1", "checkpoint.every=4")


def test_resume_is_bitwise_exact(tmp_path):
    cfg = _cfg(*RESUME)
    whole = train(cfg, tmp_path / "whole", progress=False, echo=lambda s: None)
    first = train(cfg, tmp_path / "split", stop_at=2, progress=False, echo=lambda s: None)
    second = train(cfg, tmp_path / "split", progress=False, echo=lambda s: None)
    assert second.start_step == 2
    assert {**first.losses, **second.losses} == whole.losses  # exact float equality
    assert second.eval_metrics[4] == whole.eval_metrics[4]


# The experiment as it is (2 + 2 blocks, width 128) for a quarter of its steps at a constant
# learning rate: its loss leaves the unigram plateau near step 250 (docs/speech.md).
STEPS = 500
LEARN = (f"train.steps={STEPS}", "train.schedule=constant", "train.warmup_steps=50",
         f"eval.every={STEPS}", "eval.batches=4", f"checkpoint.every={STEPS}", "log.every=100")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The experiment trained for STEPS steps: -> (run dir, its train result)."""
    run_dir = tmp_path_factory.mktemp("speech") / "run"
    return run_dir, train_optimized(_cfg(*LEARN), run_dir)


def test_it_learns_to_transcribe_held_out_clips(short_run):
    _, result = short_run
    metrics = result.eval_metrics[STEPS]
    # 64 held-out clips: a character error rate far below the unigram guess's (about 1)
    assert metrics["cer"] < 0.5, metrics
    assert metrics["loss"] < 1.2, metrics


def test_sample_command_reads_wav_and_heldout_clips(short_run, tmp_path):
    short_run, _ = short_run
    data = SpeechTask.create("speech:dtmf", 16000, 3.0, 8)
    wave, text = data.heldout(0)
    path = tmp_path / "clip.wav"
    write_wav(path, wave, 16000)
    back, rate = read_wav(path)
    # 16-bit PCM holds [-1, 1): the louder samples of a noisy clip (up to 1.25 here) clip
    assert rate == 16000 and np.abs(back - np.clip(wave, -1, 32767 / 32768)).max() < 1e-4
    lines = "".join(sample(SampleOptions(run_dir=short_run, prompts=[],
                                         audio=[str(path), "heldout:0"]))).splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: ")
    assert lines[1].startswith("heldout:0: ") and f"(reference {text!r})" in lines[1]
    beams = "".join(sample(SampleOptions(run_dir=short_run, prompts=[], audio=["heldout:0"],
                                         num_beams=2)))
    assert beams.startswith("heldout:0: ")
    slow = tmp_path / "slow.wav"
    write_wav(slow, wave[::2], 8000)
    with pytest.raises(UserError, match=r"audio at 8000 Hz; the front end is configured for "
                                        r"16000 Hz"):
        list(sample(SampleOptions(run_dir=short_run, prompts=[], audio=[str(slow)])))
    long = tmp_path / "long.wav"
    write_wav(long, np.zeros(16000 * 4, np.float32), 16000)
    with pytest.raises(UserError, match="200 encoder frames.*exceeds the model's context"):
        list(sample(SampleOptions(run_dir=short_run, prompts=[], audio=[str(long)])))


@pytest.mark.parametrize("overrides,message", [
    (("data.sample_rate=8000",), r"data.sample_rate=8000 Hz: the audio front end is configured "
                                 r"for model.audio_sample_rate=16000 Hz"),
    (("data.clip_seconds=4.0",), r"data.clip_seconds=4.0 is 200 encoder frames .* more than "
                                 r"model.max_len=150; set model.max_len >= 200"),
    (("data.seq_len=5",), r"7 characters \+ EOS = 8 decoder tokens, more than data.seq_len=5"),
    (("data.source=speech:piano",), r"unknown speech source 'speech:piano'"),
    (("objective.kind=seq2seq",), r"is trained by objective.kind='transcription'"),
    (("model.audio_mels=0",), r"needs an audio encoder \(model.audio_mels > 0"),
])
def test_bad_input_is_a_one_line_config_error(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message) as info:
        _cfg(*overrides)
    assert "\n" not in str(info.value)


def test_cli_prints_one_error_line_and_exits_2(tmp_path):
    run_dir = tmp_path / "run"
    out = subprocess.run([sys.executable, "-m", "jaxformer.cli", "train", str(EXPERIMENT),
                          "--run-dir", str(run_dir), "--set", "data.sample_rate=22050"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "22050" in lines[0]
    assert not run_dir.exists()
