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
* Multi-token prediction (``mtp_heads`` = n): each depth adds its 2·D·D input projection, one
  block of the last layer's kind and the V·D un-embedding to ``N_matmul``, and one layer's
  attention term (L counts n more layers), since training runs every depth on every token.

* LoRA (``lora.rank > 0``): the frozen weights need no weight gradients, 2 of the 6 per entry
  (``train.lora.Lora.flops_per_token``). With merged adapters the targeted kernels' weight
  gradients still run (then pulled back to A and B): ``4·N_matmul + 2·N_targeted + 6·L·T·N·H``.
  As branches (``lora.dropout > 0``) no weight gradient of the base runs, and each adapter
  entry costs 6: ``4·N_matmul + 6·N_adapters + 6·L·T·N·H``. The run's model line prints which.

MFU = flops_per_token · tokens/s / peak FLOP/s of the devices used (``mfu`` returns the
fraction; logs and ``jaxformer bench`` print it as a percentage). The peak (``peak_flops``) is
a stated one (``$JAXFORMER_PEAK_FLOPS``), a data-sheet value for known accelerators, or on CPU a
matmul rate measured once per machine and cached, so that runs on one machine are comparable.

The formula is the decoder-only one. For encoder and encoder-decoder models (tokens counted on
the encoder side) it is an approximation: it leaves out the decoder stack and cross-attention of
encoder-decoders and does not double the attention term for bidirectional attention. An image
encoder (``patch_size`` P > 0, C channels) counts its patch embedding, P²·C·D, in place of the
un-embedding, with T its tokens per image.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxformer.config import ModelConfig
from jaxformer.data.cache import atomic_write_text, resolve_cache_dir
from jaxformer.errors import UserError
from jaxformer.nn.attention_families import without_features
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
    """Trained parameters: every leaf but Performer/RFA random features (drawn, not trained)."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(without_features(params))))


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that multiply every token: attention and MLP projections and the un-embedding
    (GQA shrinks the key/value projections; a gated MLP has three matrices), or for an image
    encoder the patch embedding."""
    d, f, h = cfg.d_model, cfg.ff_width, cfg.head_size
    attn = d * h * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    per_ff = 3 if cfg.activation in GATED_ACTIVATIONS else 2
    mlp = per_ff * d * f
    # The un-embedding; an image encoder has none, but maps each patch of P*P*C pixels to D.
    head = (cfg.patch_size ** 2 * cfg.image_channels if cfg.patch_size > 0
            else cfg.vocab_size) * d
    total = cfg.n_layers * (attn + mlp) + head
    if cfg.n_experts:
        # An MoE block multiplies each token by its top-k experts, the shared experts and
        # the router, not by all experts: N counts the active weights only.
        n_moe = sum(1 for i in range(cfg.n_layers) if (i + 1) % cfg.moe_every == 0)
        expert = per_ff * d * (cfg.moe_d_ff or f)
        active = (cfg.experts_top_k + cfg.n_shared_experts) * expert + d * cfg.n_experts
        total += n_moe * (active - mlp)
    if cfg.mtp_heads:
        last_moe = cfg.n_experts and cfg.n_layers % cfg.moe_every == 0  # is_moe_layer(L - 1)
        block = attn + (active if last_moe else mlp)
        total += cfg.mtp_heads * (2 * d * d + block + cfg.vocab_size * d)
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token; see the module docstring for the formula."""
    attention = 6.0 * (cfg.n_layers + cfg.mtp_heads) * seq_len * cfg.n_heads * cfg.head_size
    return 6.0 * matmul_params(cfg) + attention


PEAK_ENV_VAR = "JAXFORMER_PEAK_FLOPS"
PEAK_CACHE_FILE = "peak_flops.json"
REMEASURE_COMMAND = "jaxformer bench --measure-peak"


class PeakFlops(NamedTuple):
    """A device's peak FLOP/s and where the number came from, for the log."""

    flops: float
    source: str

    def describe(self) -> str:
        """For the log: "peak 146.8 GFLOP/s per device (<where the number came from>)"."""
        return f"peak {self.flops / 1e9:,.1f} GFLOP/s per device ({self.source})"


def peak_flops(device: jax.Device, dtype: str = "float32", *,
               remeasure: bool = False) -> PeakFlops:
    """The peak FLOP/s of one device that MFU is relative to, and its source.

    In order: ``$JAXFORMER_PEAK_FLOPS`` (a stated peak, any device); the data-sheet dense
    peak of a known accelerator; on CPU, the ``dtype`` matmul rate measured once per machine
    (CPU model, cores, dtype) and cached in ``peak_flops.json`` under the jaxformer cache dir,
    so that every run on a machine divides by the same number (``remeasure=True``, or
    ``jaxformer bench --measure-peak``, measures again and replaces the cached value).
    Unknown accelerators: NaN. A bad ``$JAXFORMER_PEAK_FLOPS`` raises UserError.
    """
    stated = os.environ.get(PEAK_ENV_VAR)
    if stated is not None:
        return PeakFlops(_parse_stated_peak(stated), f"{PEAK_ENV_VAR}={stated.strip()}")
    kind = getattr(device, "device_kind", "")
    for name, peaks in _PEAK_TABLE.items():
        if name.lower() in kind.lower():
            which = dtype if dtype in peaks else "float32"
            return PeakFlops(peaks[which], f"data sheet, {name} {which}")
    if device.platform == "cpu":
        return cached_cpu_peak(dtype, remeasure=remeasure)
    return PeakFlops(float("nan"), f"unknown for device kind {kind!r}; set {PEAK_ENV_VAR}")


def _parse_stated_peak(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{PEAK_ENV_VAR}={text!r} is not a peak: give FLOP/s per device as a "
                        "positive number, e.g. 1.5e11")
    return value


def cpu_identity() -> tuple[str, int]:
    """(CPU model name, cores this process may run on): what a CPU peak depends on."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), "")
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    # Cores allowed by affinity (taskset, cgroups' cpusets), not the machine's total: XLA's
    # thread pool and hence the peak follow them.
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return model, int(cores or 1)


def peak_cache_path() -> Path:
    return resolve_cache_dir() / PEAK_CACHE_FILE


def cached_cpu_peak(dtype: str = "float32", *, remeasure: bool = False) -> PeakFlops:
    """This machine's measured CPU matmul peak for ``dtype``, from the cache file, measured
    (and written there) only when it has no entry for this CPU model, core count and dtype,
    or when ``remeasure``."""
    model, cores = cpu_identity()
    key = f"{model} | {cores} cores | {dtype}"
    path = peak_cache_path()
    entries = _read_peak_cache(path)
    entry = entries.get(key)
    how = "cached"
    if remeasure or not isinstance(entry, dict) or not _positive(entry.get("flops")):
        entry = {"flops": measure_cpu_matmul_peak(dtype), "measured": time.strftime("%Y-%m-%d"),
                 "matmul": f"{dtype} {_PEAK_N}x{_PEAK_N}x{_PEAK_N}, best over "
                           f">= {_PEAK_REPEATS} runs and {_PEAK_SECONDS:g} s",
                 "load_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
                 "jax": jax.__version__}
        entries[key] = entry
        try:
            atomic_write_text(path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
        except OSError as e:  # a read-only cache dir costs a re-measurement next time, no more
            warnings.warn(f"could not cache the CPU peak in {path}: {e}", stacklevel=2)
        how = "measured now"
    load = entry.get("load_1m")
    # Other processes on the cores (a load average above the core count) make the best matmul
    # slower than the machine can do, and every MFU divided by it too high.
    busy = (f"; the machine was busy when measured (load average {load:g} on {cores} cores), "
            "so this peak is likely low" if _positive(load) and load > cores else "")
    return PeakFlops(float(entry["flops"]),
                     f"{how}: best {dtype} {_PEAK_N}³ matmul on {model} ({cores} cores, "
                     f"{entry.get('measured', '?')}), in {path}{busy}; re-measure with "
                     f"`{REMEASURE_COMMAND}` or state it with {PEAK_ENV_VAR}")


def _positive(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


def _read_peak_cache(path: Path) -> dict[str, Any]:
    """The cache file's entries; {} when it is missing or unreadable (then it is rewritten)."""
    try:
        entries = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


_PEAK_N = 2048
_PEAK_REPEATS = 10
_PEAK_SECONDS = 3.0


def measure_cpu_matmul_peak(dtype: str = "float32", n: int = _PEAK_N,
                            repeats: int = _PEAK_REPEATS,
                            min_seconds: float = _PEAK_SECONDS) -> float:
    """Best FLOP/s of an n×n ``dtype`` matmul (2n³ FLOPs) on the default device, over at least
    ``repeats`` matmuls and ``min_seconds``: on a shared machine other work only ever slows a
    matmul down, and a few seconds give the best a chance to land in a quiet moment."""
    a = jax.random.normal(jax.random.key(0), (n, n), dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    began, done = time.perf_counter(), 0
    while done < repeats or time.perf_counter() - began < min_seconds:
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
        done += 1
    return 2.0 * n**3 / best


def implausible_mfu_note(mfu_percent: float, peak: PeakFlops) -> str | None:
    """A warning when MFU is above 100%: the peak it divides by is below what the device just
    did (a CPU peak measured while the machine was busy, or a stated one too low)."""
    if mfu_percent <= 100:
        return None
    return (f"warning: MFU {mfu_percent:.0f}% is above 100%: the {peak.describe()} is below "
            "what this run reaches; re-measure it with `jaxformer bench --measure-peak` on an "
            "idle machine, or state it with JAXFORMER_PEAK_FLOPS")


def mfu(flops_per_tok: float, tokens_per_sec: float, n_devices: int, peak_per_device: float
        ) -> float:
    """Model FLOPs utilization as a fraction (0.47); logs and ``bench`` show it as a
    percentage (47.1%)."""
    return flops_per_tok * tokens_per_sec / (n_devices * peak_per_device)
