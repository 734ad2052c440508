"""Byte-level document matching, as in the Long Range Arena's retrieval task (Tay et al. 2021),
offline: do two Python standard-library files come from the same package? A two-tower encoder
(``model.two_tower``) reads each file's first 511 bytes on its own, with the same weights, and
classifies the pair with a ReLU MLP over [u, v, u*v, u-v] of the two pooled states (LRA's dual
head; u, v the mean of each file's final states, ``model.pooling='mean'``: with the CLS state
alone it stayed at chance). (LRA matches papers of the ACL Anthology Network by citation, 4k
bytes each.)

    jaxformer train experiments/lra_retrieval.py

Pairs are drawn per step from the training files; the held-out pairs only from held-out files
(every 5th file of a package). Half of the pairs match, so chance is 0.5 (the eval also prints
the majority class of its own pairs). A row holds the two documents one after the other: 2 x
512 tokens.
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
from jaxformer.data.lra import BYTE_VOCAB
from jaxformer.models import presets


def config() -> Config:
    seq_len = 512  # per document
    return Config(
        name="lra_retrieval",
        model=presets.bert(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_len=seq_len,
                           vocab_size=BYTE_VOCAB, num_labels=2, two_tower=True,
                           pooling="mean", type_vocab_size=0, norm_position="pre",
                           final_norm=True),
        data=DataConfig(source="lra:retrieval", seq_len=seq_len),
        objective=ObjectiveConfig(kind="classification"),
        train=TrainConfig(batch_size=8, steps=150, lr=1e-3),
        checkpoint=CheckpointConfig(every=150, keep=1),
        log=LogConfig(every=15),
        eval=EvalConfig(every=75, batches=8),
    )
