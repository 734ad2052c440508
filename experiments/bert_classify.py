"""Fine-tune the masked-LM encoder of bert_tiny as a classifier: which standard-library
package (distutils, asyncio, email, importlib on CPython 3.11) does a 64-token snippet come
from? Held-out snippets come from files never seen in fine-tuning.

    jaxformer train experiments/bert_tiny.py        # first: the pretrained encoder
    jaxformer train experiments/bert_classify.py

The encoder weights come from runs/bert_tiny (train.init_from); the pooler and classifier are
new. The eval accuracy compares with the majority class (0.25: the held-out set is balanced).
"""

import dataclasses

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
    pretrained = presets.bert(n_layers=4, d_model=192, n_heads=4, vocab_size=4096, max_len=128)
    return Config(
        name="bert_classify",
        model=dataclasses.replace(pretrained, num_labels=4, dropout=0.1),
        data=DataConfig(source="stdlib", seq_len=64),
        objective=ObjectiveConfig(kind="classification"),
        train=TrainConfig(batch_size=32, steps=150, lr=3e-4, warmup_steps=15,
                          init_from="runs/bert_tiny"),
        checkpoint=CheckpointConfig(every=150, keep=1),
        log=LogConfig(every=10),
        eval=EvalConfig(every=50, batches=16),
    )
