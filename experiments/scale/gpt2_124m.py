"""GPT-2 small (Radford et al. 2019): 12 layers, d_model 768, 12 heads, vocabulary 50,304 (50,257
padded to a multiple of 128), context 1,024; 124M parameters.

A scale preset for ``jaxformer compile`` (docs/scaling.md): which mesh and remat fit a TPU
topology, and the step's estimated MFU, before renting it:

    jaxformer compile experiments/scale/gpt2_124m.py --topology v5p:4x4x8
    jaxformer compile experiments/scale/gpt2_124m.py --topology v5e:16x16 --sweep

bfloat16 compute over float32 parameters and Adam moments, layers scanned, FSDP over every chip.
Global batch 512 x 1024 tokens; set train.batch_size to a multiple of the batch shards.
"""

from jaxformer.config import Config, DataConfig, MeshConfig, TrainConfig
from jaxformer.models import presets


def config() -> Config:
    return Config(
        name="gpt2_124m",
        model=presets.gpt2(n_layers=12, d_model=768, n_heads=12, vocab_size=50304, max_len=1024,
                            compute_dtype="bfloat16", scan_layers=True, remat="full"),
        data=DataConfig(source="stdlib", seq_len=1024),
        train=TrainConfig(batch_size=512, steps=10000, lr=6e-4, warmup_steps=1000),
        mesh=MeshConfig(preset="fsdp"),
    )
