"""BERT-style masked-LM pretraining on the Python standard library's source (no download).

    jaxformer train experiments/bert_tiny.py

Post-LN encoder, learned positions, GELU, tied MLM head; 15% of tokens selected, 80/10/10.
The eval accuracy is the masked-token accuracy; compare it with the unigram baseline's (the
most frequent token). Then fine-tune a classifier from it: experiments/bert_classify.py.
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
        name="bert_tiny",
        model=presets.bert(n_layers=4, d_model=192, n_heads=4, vocab_size=4096, max_len=128),
        data=DataConfig(source="stdlib", seq_len=128),
        objective=ObjectiveConfig(kind="masked_lm"),
        train=TrainConfig(batch_size=32, steps=300, lr=1e-3, warmup_steps=30),
        checkpoint=CheckpointConfig(every=150, keep=2),
        log=LogConfig(every=10),
        eval=EvalConfig(every=150, batches=16),
    )
