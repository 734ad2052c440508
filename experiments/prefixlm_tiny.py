"""A prefix-LM decoder on the Python standard library's source: each document's first 25-75%
is a bidirectional prefix, and the loss covers only the continuation.

    jaxformer train experiments/prefixlm_tiny.py

Same model and budget as llama_tiny; scripts/prefix_vs_causal.py compares its continuation
loss with a causal model's on the same tokens.
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
        name="prefixlm_tiny",
        model=presets.prefix_lm(n_layers=4, d_model=192, n_heads=4, n_kv_heads=2,
                                vocab_size=4096, max_len=256),
        data=DataConfig(source="stdlib", seq_len=256),
        objective=ObjectiveConfig(kind="prefix_lm"),
        train=TrainConfig(batch_size=16, steps=450, lr=3e-3, warmup_steps=30),
        checkpoint=CheckpointConfig(every=150, keep=2),
        log=LogConfig(every=10),
        eval=EvalConfig(every=150, batches=16),
    )
