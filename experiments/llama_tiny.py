"""A small Llama-style decoder (RMSNorm, RoPE, SwiGLU, grouped-query attention with 2 key/value
heads for 4 query heads, no biases, untied head) on the Python standard library's source.

    jaxformer train experiments/llama_tiny.py

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
        name="llama_tiny",
        model=presets.llama(n_layers=4, d_model=192, n_heads=4, n_kv_heads=2, vocab_size=4096,
                            max_len=256),
        data=DataConfig(source="stdlib", seq_len=256),
        train=TrainConfig(batch_size=16, steps=450, lr=3e-3, warmup_steps=30),
        checkpoint=CheckpointConfig(every=150, keep=2),
        log=LogConfig(every=10),
        eval=EvalConfig(every=150, batches=16),
    )
