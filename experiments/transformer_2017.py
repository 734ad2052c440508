"""The original Transformer (Vaswani et al., 2017) on a synthetic translation task.

    jaxformer train experiments/transformer_2017.py

Post-LN encoder-decoder, sinusoidal positions, ReLU, shared embeddings scaled by sqrt(d), label
smoothing 0.1, dropout 0.1, and the paper's inverse-square-root schedule with warmup. The task
(`synthetic:reverse`) maps a source string to its reverse in a separate target alphabet;
evaluation decodes held-out sources greedily and reports exact-sequence accuracy.
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
        name="transformer_2017",
        model=presets.transformer_2017(n_layers=3, d_model=128, n_heads=4, d_ff=512,
                                       vocab_size=64, max_len=32, dropout=0.1),
        data=DataConfig(source="synthetic:reverse", seq_len=17),
        objective=ObjectiveConfig(kind="seq2seq", label_smoothing=0.1),
        # lr is the multiplier of the paper's d^-0.5 * min(n^-0.5, n * warmup^-1.5); Adam's
        # betas (0.9, 0.98) as in the paper.
        train=TrainConfig(batch_size=64, steps=2000, schedule="inverse_sqrt", lr=0.3,
                          warmup_steps=200, beta1=0.9, beta2=0.98, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=500, keep=2),
        log=LogConfig(every=50),
        eval=EvalConfig(every=500, batches=16),
    )
