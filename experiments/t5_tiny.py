"""T5 v1.1-style span-corruption pretraining on the Python standard library's source.

    jaxformer train experiments/t5_tiny.py

Encoder inputs of 128 tokens after corruption (density 0.15, mean span 3; each span replaced
by one sentinel), decoder targets of sentinel + span tokens; the eval accuracy is the
target-token accuracy.
"""

from jaxformer.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LogConfig,
    ObjectiveConfig,
    TrainConfig,
)
from jaxformer.models import presets


def config() -> Config:
    return Config(
        name="t5_tiny",
        model=presets.t5_v1_1(n_layers=3, n_decoder_layers=3, d_model=192, n_heads=4,
                              vocab_size=4096, max_len=256),
        data=DataConfig(source="stdlib", seq_len=128),
        objective=ObjectiveConfig(kind="span_corruption"),
        train=TrainConfig(batch_size=32, steps=300, lr=2e-3, warmup_steps=30),
        checkpoint=CheckpointConfig(every=150, keep=2),
        log=LogConfig(every=10),
        eval=EvalConfig(every=150, batches=16),
    )
