"""A small Whisper-style speech recognizer (Radford et al. 2022) on synthesized Morse-code audio:
random 3- to 6-character texts of a-z, 0-9 and spaces keyed at 20 to 40 words per minute with
noise (``jaxformer.data.speech``), transcribed character by character.

    jaxformer train experiments/speech_morse.py

The model reads the waves: a 40-channel log-Mel spectrogram (Whisper's 25 ms windows and 10 ms
hop, computed in the model), two kernel-3 convolutions with GELU (the second of stride 2: 3 s
is 150 encoder frames), fixed sinusoidal encoder positions, then encoder and decoder blocks
with cross-attention over a 40-symbol character vocabulary. The eval reports the held-out
character error rate of greedy transcripts (``cer``); docs/speech.md has the rate this
reaches and how long it takes.
"""

from jaxformer.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LogConfig,
    ObjectiveConfig,
    SampleConfig,
    TrainConfig,
)
from jaxformer.models import presets

CLIP_SECONDS = 3.0
ENCODER_FRAMES = 150  # 3 s = 300 spectrogram frames, halved by the stride-2 convolution


def config() -> Config:
    return Config(
        name="speech_morse",
        model=presets.whisper(n_layers=2, n_decoder_layers=2, d_model=128, n_heads=4,
                              d_ff=256, vocab_size=40, audio_mels=40,
                              max_len=ENCODER_FRAMES),
        data=DataConfig(source="speech:morse", seq_len=8, sample_rate=16000,
                        clip_seconds=CLIP_SECONDS),
        objective=ObjectiveConfig(kind="transcription"),
        train=TrainConfig(batch_size=16, steps=1500, lr=1e-3, warmup_steps=100,
                          weight_decay=0.01),
        checkpoint=CheckpointConfig(every=1500, keep=1),
        log=LogConfig(every=100),
        eval=EvalConfig(every=500, batches=0),
        sample=SampleConfig(count=0),
    )
