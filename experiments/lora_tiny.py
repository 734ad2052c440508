"""LoRA fine-tuning (Hu et al. 2021) of a trained gpt_tiny on held-out code: IDLE's source
(``idlelib``, Tk GUI code, left out of the ``stdlib`` corpus gpt_tiny trains on).

    jaxformer train experiments/gpt_tiny.py                      # the base: runs/gpt_tiny
    jaxformer train experiments/lora_tiny.py                     # LoRA: runs/lora_tiny
    jaxformer train experiments/lora_tiny.py --set lora.rank=0 --set train.lr=1e-3 \\
        --run-dir runs/full_tiny                                 # full fine-tuning, compared

Rank-8 adapters on every attention and MLP kernel (4.2% as many weights as the model); the base's
weights stay frozen outside the train state. Validation loss after 100 steps (docs/lora.md):
4.898 with LoRA, 4.371 with full fine-tuning, 5.179 for the base as it is: LoRA is not within
2% of full fine-tuning on this task (the embeddings it keeps frozen matter here).
"""

from jaxformer.config import (
    CheckpointConfig,
    Config,
    DataConfig,
    EvalConfig,
    LogConfig,
    LoraConfig,
    ModelConfig,
    SampleConfig,
    TrainConfig,
)
from jaxformer.data.stdlib_corpus import stdlib_root


def config() -> Config:
    return Config(
        name="lora_tiny",
        # The architecture is the base's (train.init_from); these are gpt_tiny's, for a run
        # without a base (the experiments test) and for the kernel choice, which is ours.
        model=ModelConfig(n_layers=4, d_model=192, n_heads=4, vocab_size=4096, max_len=256,
                          attention="blocked"),
        # Binary files (.pyc, images) in the directory are skipped with a note.
        data=DataConfig(source=str(stdlib_root() / "idlelib"), seq_len=256, val_fraction=0.1),
        train=TrainConfig(batch_size=16, steps=100, lr=2e-2, warmup_steps=10,
                          init_from="runs/gpt_tiny"),
        lora=LoraConfig(rank=8, alpha=16.0, targets=("all",)),
        checkpoint=CheckpointConfig(every=50, keep=2),
        log=LogConfig(every=10),
        eval=EvalConfig(every=50, batches=16),
        sample=SampleConfig(count=0),
    )
