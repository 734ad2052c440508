"""The speech_tiny recognizer on synthesized Morse code instead of touch tones: random 3- to
6-character texts of a-z, 0-9 and spaces keyed at 20 to 40 words per minute with noise
(``jaxformer.data.speech``), transcribed character by character, from a 40-channel log-Mel
spectrogram; everything else as experiments/speech_tiny.py.

    jaxformer train experiments/speech_morse.py

This one does not learn on a CPU budget: docs/speech.md ("Morse code: not learned") has what
it reaches and what was tried.
"""

import dataclasses
from pathlib import Path

from jaxformer.config import Config, load_experiment


def config() -> Config:
    base = load_experiment(Path(__file__).with_name("speech_tiny.py"))
    return dataclasses.replace(
        base, name="speech_morse",
        model=dataclasses.replace(base.model, audio_mels=40),
        data=dataclasses.replace(base.data, source="speech:morse", seq_len=7),
        train=dataclasses.replace(base.train, steps=1500),
        checkpoint=dataclasses.replace(base.checkpoint, every=1500))
