"""A small Vision Transformer (Dosovitskiy et al. 2021) on scikit-learn's 8x8 handwritten
digits: 2x2 patches (16 of them, after a [CLS] token), 10 classes.

    jaxformer train experiments/vit_digits.py

Every 5th image (360 of 1,797) is held out, and the eval reads all of them (the majority
class scores 0.133). Pixels are grey levels / 16, in [0, 1]. docs/vision.md has the accuracy
this reaches, how long it takes, and the settings tried on the way
(``--set model.pos_encoding=sinusoidal_2d`` for the 2-D sin-cos positions).
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

PATCH, SIDE = 2, 8
TOKENS = (SIDE // PATCH) ** 2 + 1  # patches + [CLS]


def config() -> Config:
    return Config(
        name="vit_digits",
        # init_std 0.1 (about d_model^-0.5) rather than GPT's 0.02: at width 64 the smaller
        # init left the held-out accuracy at 0.67 after 150 steps, 0.96 after 2,000.
        model=presets.vit(n_layers=3, d_model=64, n_heads=4, d_ff=128, patch_size=PATCH,
                          image_size=SIDE, image_channels=1, num_labels=10, max_len=TOKENS,
                          init_std=0.1, dropout=0.1),
        data=DataConfig(source="image:digits", seq_len=TOKENS),
        objective=ObjectiveConfig(kind="classification"),
        train=TrainConfig(batch_size=64, steps=2000, lr=3e-3, warmup_steps=50,
                          weight_decay=0.05),
        checkpoint=CheckpointConfig(every=2000, keep=1),
        log=LogConfig(every=100),
        eval=EvalConfig(every=500, batches=0),
    )
