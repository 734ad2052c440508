"""The Long Range Arena-style comparison: every attention family on every task, one sweep.

    jaxformer sweep experiments/lra_sweep.py --dry-run   # the 50 points and their run dirs
    jaxformer sweep experiments/lra_sweep.py             # train them, task by task
    python scripts/lra_results.py runs/lra_sweep         # accuracy / steps/s / memory table

10 attention types (dense ``mha`` and the nine families of docs/efficient_attention.md) x 5
tasks (``lra:listops``, ``lra:text``, ``lra:retrieval``, ``lra:image``, ``lra:pathfinder``).
One small encoder for all (2 pre-LN layers, d_model 64, 4 heads, d_ff 128, as LRA's Transformer
in miniature), 300 steps at lr 1e-3, lengths cut to what 2 CPU cores train in minutes: ListOps
256 tokens, text 512 bytes, retrieval 2 x 256 bytes, images 1,024 pixels (rows of 1,056). The
byte-level tasks pool the mean of the final states (``model.pooling='mean'``): with the first
token's state the retrieval model stayed at chance (0.500 at 300 steps); retrieval pairs are
classified by the two-tower model's MLP head (dense attention: 66.0% at 300 steps). The eval
scores 8 batches (128 rows) of ListOps and text (all 28 held-out text files), but every
held-out retrieval pair (256) and image (360), and 512 Pathfinder images: with 8 batches of 8
images a point's accuracy had a standard error of ~6 points, too coarse to tell a family that
learns from chance. Blocks of 32 (``attention_block``) divide
every length; ``aft_local`` gets a window of 128. Running the command again skips the finished
points (docs/sweeps.md), so the sweep can be run in pieces.
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
from jaxformer.nn.attention_families import FAMILIES

MAX_LEN = 1056

# task -> its overrides: source, row length, classes, batch, two-tower
TASKS: dict[str, dict[str, object]] = {
    "listops": {"data.source": "lra:listops", "data.seq_len": 256, "model.num_labels": 10,
                "train.batch_size": 16},
    "text": {"data.source": "lra:text", "data.seq_len": 512, "model.num_labels": 4,
             "model.pooling": "mean", "train.batch_size": 16},
    "retrieval": {"data.source": "lra:retrieval", "data.seq_len": 256, "model.num_labels": 2,
                  "model.two_tower": True, "model.pooling": "mean", "train.batch_size": 16,
                  "eval.batches": 0},  # all 256 held-out pairs
    "image": {"data.source": "lra:image", "data.seq_len": MAX_LEN, "model.num_labels": 10,
              "train.batch_size": 8, "eval.batches": 0},  # all 360 held-out images
    "pathfinder": {"data.source": "lra:pathfinder", "data.seq_len": MAX_LEN,
                   "model.num_labels": 2, "train.batch_size": 8, "eval.batches": 64},  # 512
}
ATTENTION_TYPES = ("mha", *FAMILIES)


def config() -> Config:
    return Config(
        name="lra",  # the sweep dir is runs/lra_sweep
        # One vocabulary (258 ids) holds every task's ids (ListOps uses the first 17).
        model=presets.bert(n_layers=2, d_model=64, n_heads=4, d_ff=128, max_len=MAX_LEN,
                           vocab_size=BYTE_VOCAB, num_labels=10, type_vocab_size=0,
                           norm_position="pre", final_norm=True, attention_block=32),
        data=DataConfig(source="lra:listops", seq_len=256),
        objective=ObjectiveConfig(kind="classification"),
        train=TrainConfig(batch_size=16, steps=300, lr=1e-3),
        checkpoint=CheckpointConfig(every=300, keep=1),
        log=LogConfig(every=50),
        eval=EvalConfig(every=300, batches=8),
    )


def family_overrides(attention_type: str) -> dict[str, object]:
    point: dict[str, object] = {"model.attention_type": attention_type}
    if attention_type == "aft_local":
        point["model.sliding_window"] = 128
    return point


def sweep() -> list[dict[str, object]]:
    return [{**task, **family_overrides(a)} for task in TASKS.values() for a in ATTENTION_TYPES]
