"""XLNet's permutation language model (Yang et al. 2019) on the Python standard library's source:
every document gets a random factorisation order, a two-stream model predicts the last 1/K of
it (K = objective.partial_k) from the tokens before them in that order.

    jaxformer train experiments/xlnet_tiny.py

Rope positions instead of Transformer-XL's relative encoding, no recurrence memory
(docs/objectives.md, "Permutation LM"). Its validation loss (on the predicted tokens only)
falls below the unigram baseline; the numbers are in docs/objectives.md.
"""

from jaxformer.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LogConfig,
    ModelConfig,
    ObjectiveConfig,
    TrainConfig,
)


def config() -> Config:
    return Config(
        name="xlnet_tiny",
        # Pre-LN with RMSNorm and rope (the Llama layout): rope gives the query stream, which
        # holds no token, the position it predicts through every key's relative offset.
        model=ModelConfig(arch="xlnet", n_layers=3, d_model=128, n_heads=4, vocab_size=2048,
                          max_len=128, pos_encoding="rope", norm="rmsnorm", activation="swiglu",
                          use_bias=False),
        data=DataConfig(source="stdlib", seq_len=128),
        # K = 6 as XLNet-Large: the last sixth of each document's order carries the loss.
        objective=ObjectiveConfig(kind="permutation_lm", partial_k=6),
        train=TrainConfig(batch_size=16, steps=300, lr=3e-3, warmup_steps=30),
        checkpoint=CheckpointConfig(every=150, keep=2),
        log=LogConfig(every=25),
        eval=EvalConfig(every=150, batches=16),
    )
