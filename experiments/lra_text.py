"""Byte-level text classification, as in the Long Range Arena (Tay et al. 2021), offline:
which Python standard-library package (distutils, asyncio, email or importlib on Python 3.11)
a file comes from, read from its first 1,023 bytes by a small bidirectional encoder that
classifies from its CLS token. (LRA classifies IMDb reviews as bytes, 1k-4k of them.)

    jaxformer train experiments/lra_text.py

The vocabulary is 258 ids (PAD, CLS, 256 bytes); every 5th file of a package is held out (28
files on Python 3.11), and the eval reads each once (the majority class scores 0.36). Rows of
1,024 tokens are a multiple of 64, so every attention family runs the same file
(``--set model.attention_type=...``). The two-tower retrieval task over the same files:
experiments/lra_retrieval.py.
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
from jaxformer.data.lra import BYTE_VOCAB, TEXT_CLASSES
from jaxformer.models import presets


def config() -> Config:
    seq_len = 1024
    return Config(
        name="lra_text",
        # Pre-LN (with a final norm) trains from scratch without tuning; no token types.
        model=presets.bert(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_len=seq_len,
                           vocab_size=BYTE_VOCAB, num_labels=TEXT_CLASSES, type_vocab_size=0,
                           norm_position="pre", final_norm=True),
        data=DataConfig(source="lra:text", seq_len=seq_len),
        objective=ObjectiveConfig(kind="classification"),
        train=TrainConfig(batch_size=8, steps=150, lr=1e-3),
        checkpoint=CheckpointConfig(every=150, keep=1),
        log=LogConfig(every=15),
        eval=EvalConfig(every=75, batches=0),
    )
