"""ListOps as in the Long Range Arena (Tay et al. 2021; Nangia and Bowman 2018): the value
(0..9) of a nested MIN / MAX / MED / SM expression such as ``[MAX 2 9 [MIN 4 7 ] 0 ]``,
generated per step, read by a small bidirectional encoder that classifies from its CLS token.

    jaxformer train experiments/lra_listops.py

Expressions are 127 to 511 tokens (LRA: 500 to 2,000), so a row is CLS + up to 511 tokens. The
vocabulary is the task's 17 ids (PAD, CLS, ten digits, four operators, ``]``); held-out
expressions are never trained on. The eval accuracy compares with the majority class of the
held-out batches (about 0.16-0.18; LRA's Transformer reached 36-37% with 2,000-token rows)
and with what the top-level operator alone predicts: 33.9% at this length, 38.4% at LRA's
(``python scripts/listops_baselines.py --seq-len 512``; docs/efficient_attention.md).
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
from jaxformer.data.lra import LISTOPS_VOCAB
from jaxformer.models import presets


def config() -> Config:
    seq_len = 512
    return Config(
        name="lra_listops",
        # Pre-LN (with a final norm) trains from scratch without tuning; no token types.
        model=presets.bert(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_len=seq_len,
                           vocab_size=LISTOPS_VOCAB, num_labels=10, type_vocab_size=0,
                           norm_position="pre", final_norm=True),
        data=DataConfig(source="lra:listops", seq_len=seq_len),
        objective=ObjectiveConfig(kind="classification"),
        # 16 rows of 512 tokens: 0.85 s a step on 2 idle CPU cores (about 2 s when they are
        # shared), so 3 to 7 minutes.
        train=TrainConfig(batch_size=16, steps=200, lr=1e-3),
        checkpoint=CheckpointConfig(every=200, keep=1),
        log=LogConfig(every=20),
        eval=EvalConfig(every=100, batches=8),
    )
