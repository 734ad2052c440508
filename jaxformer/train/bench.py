"""``jaxformer bench``: time train steps on synthetic tokens, after compilation.

Prints progress, then one JSON line (the last line of output) with params, tokens_per_sec,
step_time_s (median over the timed steps), compile_s, flops_per_token (6N + 6·L·T·N·H, or a
LoRA run's, see ``jaxformer.train.flops``), mfu_percent, peak_flops and where that peak
came from, device (its kind: "cpu", "NVIDIA H100 80GB HBM3", "TPU v5 lite"), the mesh's axis
sizes and the memory per device in bytes. ``jaxformer bench --measure-peak`` re-measures the
cached CPU peak.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxformer import config as config_lib
from jaxformer.config import Config
from jaxformer.data import images
from jaxformer.train.flops import (
    PeakFlops,
    implausible_mfu_note,
    mfu,
    peak_flops,
)
from jaxformer.train.runtime import Runtime, build_runtime, format_memory


def synthetic_batch(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform random tokens, one document per row, every target counted (an image encoder:
    uniform random pixels in [0, 1] and labels; an image-prefix decoder: tokens and pixels; a
    token classifier: random labels as targets)."""
    b, t = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    m = cfg.model
    if m.patch_size > 0 and m.arch != "image_prefix":
        shapes = images.batch_shapes(b, m.image_size, m.image_channels)
        return {"pixels": rng.random(shapes["pixels"][0], np.float32),
                "targets": rng.integers(0, m.num_labels, (b, 1), dtype=np.int32),
                "loss_weights": np.ones((b, 1), np.float32)}
    tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "segment_ids": np.ones((b, t), np.int32),
             "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
             "loss_weights": np.ones((b, t), np.float32)}
    if m.token_labels > 0:  # a per-token classifier: targets are its labels
        batch["targets"] = rng.integers(0, m.token_labels, (b, t), dtype=np.int32)
    if m.arch == "image_prefix":  # + the images whose patches are the prefix
        batch["pixels"] = rng.random((b, m.image_size, m.image_size, m.image_channels),
                                     np.float32)
    if m.arch == "xlnet":  # + each row's factorisation order (ranks), as permutation_lm's
        batch["order"] = rng.permuted(np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)),
                                      axis=1)
    return batch


def compiled_step(cfg: Config) -> tuple[Runtime, Any, Any, dict[str, Any], float]:
    """The config's train step compiled for a synthetic batch -> (runtime, compiled step,
    initial state, batch on the mesh, compile seconds)."""
    # The student's step alone: a benchmark loads no distillation teacher (train.teacher).
    rt = build_runtime(config_lib.set_key(cfg, "train.teacher", ""))
    state = rt.init_state()
    batch = rt.put_batch(synthetic_batch(cfg))
    start = time.perf_counter()
    compiled = rt.train_step.lower(state, batch).compile()
    return rt, compiled, state, batch, time.perf_counter() - start


def timed_step(compiled: Any, state: Any, batch: dict[str, Any]
               ) -> tuple[Any, dict[str, Any], float]:
    """One train step, waited for -> (new state, metrics, wall seconds)."""
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics["loss"])
    return state, metrics, time.perf_counter() - start


def measure_peak(dtype: str = "float32") -> PeakFlops:
    """Re-measures (and re-caches) the default device's peak: the CPU matmul rate; on an
    accelerator the data-sheet value or ``$JAXFORMER_PEAK_FLOPS``, which nothing measures."""
    return peak_flops(jax.devices()[0], dtype, remeasure=True)


def _round(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits: timings on a shared machine vary in the second
    digit, so the rest is noise that makes the JSON hard to read."""
    if not math.isfinite(x) or x == 0:
        return x
    return round(x, digits - 1 - math.floor(math.log10(abs(x))))


def _memory_json(report: dict[str, float]) -> dict[str, int | float]:
    """Byte counts (and the device count) as integers; fractions to 4 significant digits."""
    return {k: int(v) if k.endswith("_bytes") or k == "devices" else _round(v)
            for k, v in report.items()}


def bench(cfg: Config, steps: int, warmup: int = 2, echo: Callable[[str], None] = print,
          remeasure_peak: bool = False) -> dict[str, Any]:
    """Times ``steps`` train steps after ``warmup`` untimed ones -> the JSON line's fields.
    ``remeasure_peak``: measure the CPU peak again instead of reading it from the cache."""
    rt, compiled, state, batch, compile_s = compiled_step(cfg)
    mesh = rt.mesh
    device = mesh.devices.flat[0]
    peak = peak_flops(device, cfg.model.compute_dtype, remeasure=remeasure_peak)
    memory = rt.memory_report(state, compiled)
    echo(f"compiled in {compile_s:.1f}s; {format_memory(memory)}; {peak.describe()}; "
         f"{warmup} warm-up + {steps} timed steps")

    times = []
    for i in range(warmup + steps):
        state, metrics, elapsed = timed_step(compiled, state, batch)
        if i >= warmup:
            times.append(elapsed)
    step_time = statistics.median(times)
    tokens_per_sec = cfg.train.batch_size * cfg.data.seq_len / step_time
    fpt = rt.flops_per_token()[0]
    mfu_percent = 100 * mfu(fpt, tokens_per_sec, mesh.size, peak.flops)
    note = implausible_mfu_note(mfu_percent, peak)
    if note:
        echo(note)
    return {
        "params": rt.n_params(state),
        "tokens_per_sec": _round(tokens_per_sec),
        "step_time_s": _round(step_time),
        "step_time_min_s": _round(min(times)),
        "compile_s": _round(compile_s, 3),
        "flops_per_token": int(fpt),
        "mfu_percent": _round(mfu_percent, 3),
        "peak_flops": _round(peak.flops),
        "peak_flops_source": peak.source,
        "n_devices": int(mesh.size),
        "device": getattr(device, "device_kind", "") or device.platform,
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "compute_dtype": cfg.model.compute_dtype,
        "final_loss": _round(float(metrics["loss"]), 5),
        "mesh": {axis: int(size) for axis, size in mesh.shape.items()},
        "mesh_preset": cfg.mesh.preset,
        "memory": _memory_json(memory),
    }


def print_result(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)
