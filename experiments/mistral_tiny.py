"""A small Mistral-style decoder: the Llama layout plus sliding-window attention (each token
sees the 64 tokens up to itself; stacked over 4 layers the receptive field still spans the
256-token sequence).

    jaxformer train experiments/mistral_tiny.py

Same budget as gpt_tiny (450 steps of 16 x 256 tokens on 2 CPU cores); numbers in
docs/models.md.
"""

from jaxformer.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LogConfig,
    TrainConfig,
)
from jaxformer.models import presets


def config() -> Config:
    return Config(
        name="mistral_tiny",
        model=presets.mistral(n_layers=4, d_model=192, n_heads=4, n_kv_heads=2,
                              sliding_window=64, vocab_size=4096, max_len=256),
        data=DataConfig(source="stdlib", seq_len=256),
        train=TrainConfig(batch_size=16, steps=450, lr=3e-3, warmup_steps=30),
        checkpoint=CheckpointConfig(every=150, keep=2),
        log=LogConfig(every=10),
        eval=EvalConfig(every=150, batches=16),
    )
