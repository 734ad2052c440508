"""Llama-3-8B's shape (Dubey et al. 2024): 32 layers, d_model 4,096, 32 query heads and 8
key/value heads, SwiGLU width 14,336, vocabulary 128,256, RoPE theta 500,000, context 8,192;
8.03B parameters.

A scale preset for ``jaxformer compile`` (docs/scaling.md): which mesh and remat fit a TPU
topology, and the step's estimated MFU, before renting it:

    jaxformer compile experiments/scale/llama3_8b.py --topology v5p:4x4x8
    jaxformer compile experiments/scale/llama3_8b.py --topology v5e:16x16 --sweep

bfloat16 compute over float32 parameters and Adam moments, layers scanned, FSDP over every chip.
Global batch 256 x 8192 tokens; set train.batch_size to a multiple of the batch shards.
"""

from jaxformer.config import Config, DataConfig, MeshConfig, TrainConfig
from jaxformer.models import presets


def config() -> Config:
    return Config(
        name="llama3_8b",
        model=presets.llama(n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336,
                            vocab_size=128256, max_len=8192, rope_theta=500000.0, norm_eps=1e-5,
                            compute_dtype="bfloat16", scan_layers=True, remat="full"),
        data=DataConfig(source="stdlib", seq_len=8192),
        train=TrainConfig(batch_size=256, steps=10000, lr=3e-4, warmup_steps=1000),
        mesh=MeshConfig(preset="fsdp"),
    )
