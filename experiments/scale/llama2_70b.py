"""Llama-2-70B's shape (Touvron et al. 2023): 80 layers, d_model 8,192, 64 query heads and 8
key/value heads, SwiGLU width 28,672, vocabulary 32,000, context 4,096; 69.0B parameters.

A scale preset for ``jaxformer compile`` (docs/scaling.md): which mesh and remat fit a TPU
topology, and the step's estimated MFU, before renting it:

    jaxformer compile experiments/scale/llama2_70b.py --topology v5p:4x4x8
    jaxformer compile experiments/scale/llama2_70b.py --topology v5e:16x16 --sweep

bfloat16 compute over float32 parameters and Adam moments, layers scanned, FSDP over every chip.
Global batch 512 x 4096 tokens; set train.batch_size to a multiple of the batch shards.
"""

from jaxformer.config import Config, DataConfig, MeshConfig, TrainConfig
from jaxformer.models import presets


def config() -> Config:
    return Config(
        name="llama2_70b",
        model=presets.llama(n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672,
                            vocab_size=32000, max_len=4096, norm_eps=1e-5,
                            compute_dtype="bfloat16", scan_layers=True, remat="full"),
        data=DataConfig(source="stdlib", seq_len=4096),
        train=TrainConfig(batch_size=512, steps=10000, lr=1.5e-4, warmup_steps=1000),
        mesh=MeshConfig(preset="fsdp"),
    )
