"""A small mixture-of-experts GPT on the Python standard library's source (no download).

    jaxformer train experiments/moe_tiny.py

gpt_tiny's shape with every block's feed-forward replaced by 8 experts of width 384,
2 of them per token (Mixtral-style top-2), capacity factor 1.25, and the Switch load-balancing
loss and ST-MoE router z-loss. Per token it computes about what gpt_tiny does (2 experts of
384 = gpt_tiny's one MLP of 768) while holding ~4x the feed-forward parameters. Logged: the
auxiliary losses, the share of dropped expert choices, the busiest expert's load, and a
per-expert load histogram (TensorBoard's histogram tab). Results in docs/scaling.md.
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
        name="moe_tiny",
        model=ModelConfig(n_layers=4, d_model=192, n_heads=4, vocab_size=4096, max_len=256,
                          n_experts=8, experts_top_k=2, moe_d_ff=384, capacity_factor=1.25),
        data=DataConfig(source="stdlib", seq_len=256),
        train=TrainConfig(batch_size=16, steps=450, lr=3e-3, warmup_steps=30),
        checkpoint=CheckpointConfig(every=150, keep=2),
        log=LogConfig(every=10),
        eval=EvalConfig(every=150, batches=16),
    )
