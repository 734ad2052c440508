"""A 32B dense decoder in the Llama layout (Qwen2.5-32B's shape): 64 layers, d_model 5,120, 40
query heads and 8 key/value heads, SwiGLU width 27,648, vocabulary 152,064, context 4,096;
32.8B parameters.

A scale preset for ``jaxformer compile`` (docs/scaling.md): which mesh and remat fit a TPU
topology, and the step's estimated MFU, before renting it:

    jaxformer compile experiments/scale/dense_32b.py --topology v5p:4x4x8
    jaxformer compile experiments/scale/dense_32b.py --topology v5e:16x16 --sweep

On v5e-256 (16 GiB chips) the FSDP default does not fit (the logits over 152k words per
sequence); FSDP x tensor=2 at a global batch of 256 does (12.4 GiB per chip):

    jaxformer compile experiments/scale/dense_32b.py --topology v5e:16x16 \
        --set mesh.preset=fsdp_tensor --set mesh.tensor=2 --set train.batch_size=256

bfloat16 compute over float32 parameters and Adam moments, layers scanned, FSDP over every chip.
Global batch 512 x 4096 tokens; set train.batch_size to a multiple of the batch shards.
"""

from jaxformer.config import Config, DataConfig, MeshConfig, TrainConfig
from jaxformer.models import presets


def config() -> Config:
    return Config(
        name="dense_32b",
        model=presets.llama(n_layers=64, d_model=5120, n_heads=40, n_kv_heads=8, d_ff=27648,
                            vocab_size=152064, max_len=4096, rope_theta=1000000.0,
                            compute_dtype="bfloat16", scan_layers=True, remat="full"),
        data=DataConfig(source="stdlib", seq_len=4096),
        train=TrainConfig(batch_size=512, steps=10000, lr=1.5e-4, warmup_steps=1000),
        mesh=MeshConfig(preset="fsdp"),
    )
