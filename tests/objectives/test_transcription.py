"""Speech recognition through the training set-up: a bitwise-exact resume of
``experiments/speech_tiny.py`` shrunk, and the one-line config errors (through the CLI too).
The model does not learn yet (docs/speech.md), so no learning or decoding test is here."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jaxformer import config as config_lib
from jaxformer.train.loop import train

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


@pytest.mark.parametrize("overrides,message", [
    (("data.sample_rate=8000",), r"data.sample_rate=8000 Hz: the audio front end is configured "
                                 r"for model.audio_sample_rate=16000 Hz"),
    (("data.clip_seconds=4.0",), r"data.clip_seconds=4.0 is 200 encoder frames .* more than "
                                 r"model.max_len=150; set model.max_len >= 200"),
    (("data.seq_len=5",), r"6 characters \+ EOS = 7 decoder tokens, more than data.seq_len=5"),
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
