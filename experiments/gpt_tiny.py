"""A small GPT trained on the Python standard library's own source (no download).

    jaxformer train experiments/gpt_tiny.py

Finishes in under 10 minutes on 2 CPU cores.
"""

from jaxformer.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    TrainConfig,
)


def config() -> Config:
    return Config(
        name="gpt_tiny",
        model=ModelConfig(n_layers=4, d_model=256, n_heads=4, vocab_size=8192, max_len=256),
        data=DataConfig(source="stdlib", seq_len=256),
        train=TrainConfig(batch_size=16, steps=1000, lr=3e-3, warmup_steps=100),
        checkpoint=CheckpointConfig(every=250, keep=2),
        log=LogConfig(every=25),
        eval=EvalConfig(every=250, batches=16),
    )
