"""Image classification from a row of pixels, as in the Long Range Arena (Tay et al. 2021):
scikit-learn's 8x8 handwritten digits upscaled to 32x32 (LRA uses grey CIFAR-10), flattened
row by row into 1,024 intensity tokens after a CLS token, 10 classes, read by a small
bidirectional encoder that classifies from its CLS token.

    jaxformer train experiments/lra_image.py

The vocabulary is 258 ids (PAD, CLS, 256 intensities); every 5th image (360 of 1,797) is held
out, and the eval reads all of them (the majority class scores 0.11). Rows are 1,056 tokens
(CLS + 1,024 pixels + padding), a multiple of 32, so block-sparse attention families can run
the same file (``--set model.attention_type=...``). The generated Pathfinder task (are the two
dots joined by one dashed curve?) has the same vocabulary and length:
``--set data.source=lra:pathfinder --set model.num_labels=2``.
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
from jaxformer.data.lra import IMAGE_VOCAB
from jaxformer.models import presets


def config() -> Config:
    seq_len = 1056
    return Config(
        name="lra_image",
        # Pre-LN (with a final norm) trains from scratch without tuning; no token types.
        model=presets.bert(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_len=seq_len,
                           vocab_size=IMAGE_VOCAB, num_labels=10, type_vocab_size=0,
                           norm_position="pre", final_norm=True),
        data=DataConfig(source="lra:image", seq_len=seq_len),
        objective=ObjectiveConfig(kind="classification"),
        # 8 rows of 1,056 tokens: 2.2 s a step on 2 CPU cores shared with other work (less
        # when idle), so at most ~6 minutes, plus evals of all 360 held-out images.
        train=TrainConfig(batch_size=8, steps=150, lr=1e-3),
        checkpoint=CheckpointConfig(every=150, keep=1),
        log=LogConfig(every=15),
        eval=EvalConfig(every=75, batches=0),
    )
