"""``jaxformer bench``: time train steps on synthetic tokens, after compilation.

Prints progress, then one JSON line (the last line of output) with params, tokens_per_sec,
step_time_s (median over the timed steps), compile_s, flops_per_token (6N + 6·L·T·N·H, see
``jaxformer.train.flops``), mfu, peak_flops and device.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO, Any

import jax
import numpy as np

from jaxformer.config import Config
from jaxformer.train.flops import count_params, device_peak_flops, flops_per_token, mfu
from jaxformer.train.runtime import Runtime, build_runtime, format_memory

# The GPT of docs/benchmarks.md (the side-by-side with Hugging Face): overrides on
# experiments/gpt_tiny.py, used by the profiling and round-robin scripts.
BENCHMARK_GPT = ("model.n_layers=4", "model.d_model=256", "model.n_heads=4",
                 "model.vocab_size=8192", "data.seq_len=256", "model.max_len=256",
                 "train.batch_size=8")


def synthetic_batch(cfg: Config, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform random tokens, one document per row, every target counted."""
    b, t = cfg.train.batch_size, cfg.data.seq_len
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((b, t), np.int32),
            "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (b, t)).copy(),
            "loss_weights": np.ones((b, t), np.float32)}


def compiled_step(cfg: Config) -> tuple[Runtime, Any, Any, dict[str, Any], float]:
    """The config's train step compiled for a synthetic batch -> (runtime, compiled step,
    initial state, batch on the mesh, compile seconds)."""
    rt = build_runtime(cfg)
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


def read_reply(worker: subprocess.Popen) -> dict[str, Any]:
    """The next JSON line a ``serve_steps`` worker process wrote (its facts line first)."""
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"the step worker exited with {worker.wait()}")
    return json.loads(line)


def request_step(worker: subprocess.Popen) -> dict[str, Any]:
    """Asks a ``serve_steps`` worker process for one timed step and returns its reply."""
    try:
        worker.stdin.write("\n")
        worker.stdin.flush()
    except BrokenPipeError:
        pass  # the worker has exited; read_reply says so with its exit status
    return read_reply(worker)


def serve_steps(cfg: Config, warmup: int = 3, requests: IO[str] = sys.stdin,
                replies: IO[str] = sys.stdout) -> None:
    """Timed train steps on request, for benchmark scripts that interleave the steps of
    several processes (``scripts/bench_malloc.py``, ``scripts/bench_vs_hf.py --interleave``).

    Compiles the config's train step on a synthetic batch and runs ``warmup`` steps; writes a
    JSON line ``{"params", "flops_per_token", "compile_s"}``; then, for each line read from
    ``requests``, runs one step and writes ``{"s": seconds, "loss", "faults": minor page
    faults during the step, "maxrss_mib": the process's peak resident memory}``.
    """
    import resource

    _, compiled, state, batch, compile_s = compiled_step(cfg)
    for _ in range(warmup):
        state, _, _ = timed_step(compiled, state, batch)

    def reply(obj: dict[str, Any]) -> None:
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    reply({"params": count_params(state.params), "compile_s": compile_s,
           "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len)})
    for _ in requests:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        state, metrics, elapsed = timed_step(compiled, state, batch)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        reply({"s": elapsed, "loss": float(metrics["loss"]),
               "faults": usage.ru_minflt - faults, "maxrss_mib": usage.ru_maxrss / 1024})


def bench(cfg: Config, steps: int, warmup: int = 2,
          echo: Callable[[str], None] = print) -> dict[str, Any]:
    rt, compiled, state, batch, compile_s = compiled_step(cfg)
    mesh = rt.mesh
    memory = rt.memory_report(state, compiled)
    echo(f"compiled in {compile_s:.1f}s; {format_memory(memory)}; {warmup} warm-up + {steps} "
         "timed steps")

    times = []
    for i in range(warmup + steps):
        state, metrics, elapsed = timed_step(compiled, state, batch)
        if i >= warmup:
            times.append(elapsed)
    step_time = statistics.median(times)
    tokens_per_sec = cfg.train.batch_size * cfg.data.seq_len / step_time
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    device = mesh.devices.flat[0]
    peak = device_peak_flops(device, cfg.model.compute_dtype)
    return {
        "params": count_params(state.params),
        "tokens_per_sec": tokens_per_sec,
        "step_time_s": step_time,
        "step_time_min_s": min(times),
        "compile_s": compile_s,
        "flops_per_token": fpt,
        "mfu": mfu(fpt, tokens_per_sec, mesh.size, peak),
        "peak_flops": peak,
        "n_devices": mesh.size,
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "batch_size": cfg.train.batch_size,
        "seq_len": cfg.data.seq_len,
        "compute_dtype": cfg.model.compute_dtype,
        "final_loss": float(metrics["loss"]),
        "mesh": {a: n for a, n in mesh.shape.items() if n > 1},
        "memory": memory,
    }


def print_result(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)
