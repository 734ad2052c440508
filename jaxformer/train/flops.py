"""Parameter counts, FLOPs per token, device peak FLOP/s and model FLOPs utilization (MFU).

FLOPs per trained token (PaLM appendix B convention, causal attention halved):

    flops_per_token = 6 * N_matmul + 6 * L * T * N * H

* ``N_matmul`` counts the weights that take part in matrix multiplies: per layer the query and
  output projections (2·D·N·H), the key and value projections (2·D·K·H, smaller under GQA/MQA)
  and the MLP matrices (2·D·F, or 3·D·F for gated SwiGLU/GeGLU), plus V·D for the
  un-embedding. Embedding and position lookups, biases and norm scales cost no matmul FLOPs.
  A matmul with a weight of n entries costs 2n FLOPs per token forward, and training (forward
  + backward) costs three times the forward: 6n. (For GPT-2, N·H = D and K = N: 4·D² + 2·D·F.)
* ``6·L·T·N·H``: per layer and token, the forward QKᵀ and AV products cost 2·T·N·H each
  (4·T·N·H); training triples it; causal masking halves the useful part (6·T·N·H).

* Mixture of experts: an MoE block's MLP term counts the weights a token passes through,
  (top_k + shared experts) · 2·D·F_expert (3· gated) plus the D·E router, not all E experts.
  The dispatch/combine einsums of the capacity path are overhead, not model FLOPs.

MFU = flops_per_token · tokens/s / peak FLOP/s of the devices used.

The formula is the decoder-only one. For encoder and encoder-decoder models (tokens counted on
the encoder side) it is an approximation: it leaves out the decoder stack and cross-attention of
encoder-decoders and does not double the attention term for bidirectional attention.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.nn.feedforward import GATED_ACTIVATIONS

# Dense peak FLOP/s per chip from vendor data sheets, by dtype.
_PEAK_TABLE = {
    "H100": {"bfloat16": 989.4e12, "float32": 494.7e12},  # SXM; float32 runs as TF32
    "H200": {"bfloat16": 989.4e12, "float32": 494.7e12},
    "A100": {"bfloat16": 312e12, "float32": 156e12},
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},
    "TPU v5p": {"bfloat16": 459e12, "float32": 459e12},
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},
}


def count_params(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that multiply every token: attention and MLP projections and the un-embedding
    (GQA shrinks the key/value projections; a gated MLP has three matrices)."""
    d, f, h = cfg.d_model, cfg.ff_width, cfg.head_size
    attn = d * h * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    per_ff = 3 if cfg.activation in GATED_ACTIVATIONS else 2
    mlp = per_ff * d * f
    total = cfg.n_layers * (attn + mlp) + cfg.vocab_size * d
    if cfg.n_experts:
        # An MoE block multiplies each token by its top-k experts, the shared experts and
        # the router, not by all experts: N counts the active weights only.
        n_moe = sum(1 for i in range(cfg.n_layers) if (i + 1) % cfg.moe_every == 0)
        expert = per_ff * d * (cfg.moe_d_ff or f)
        active = (cfg.experts_top_k + cfg.n_shared_experts) * expert + d * cfg.n_experts
        total += n_moe * (active - mlp)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token; see the module docstring for the formula."""
    attention = 6.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_size
    return 6.0 * matmul_params(cfg) + attention


def device_peak_flops(device: jax.Device, dtype: str = "float32") -> float:
    """Peak FLOP/s of one device: the data-sheet value for known accelerators; on CPU the
    measured float32 matmul rate (``JAXFORMER_PEAK_FLOPS`` overrides either)."""
    if "JAXFORMER_PEAK_FLOPS" in os.environ:
        return float(os.environ["JAXFORMER_PEAK_FLOPS"])
    kind = getattr(device, "device_kind", "")
    for name, peaks in _PEAK_TABLE.items():
        if name.lower() in kind.lower():
            return peaks.get(dtype, peaks["float32"])
    if device.platform == "cpu":
        return measured_cpu_matmul_peak()
    return float("nan")


@functools.cache
def measured_cpu_matmul_peak(n: int = 2048, repeats: int = 5) -> float:
    """Best float32 FLOP/s of an n×n matmul (2n³ FLOPs) on the default CPU device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best


def mfu(flops_per_tok: float, tokens_per_sec: float, n_devices: int, peak_per_device: float
        ) -> float:
    return flops_per_tok * tokens_per_sec / (n_devices * peak_per_device)
