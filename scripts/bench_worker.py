"""Timed train steps served on request, for benchmark scripts that interleave the steps of
several processes (``bench_malloc.py``, ``bench_vs_hf.py --interleave``), and the GPT those
scripts and ``profile_step.py`` / ``bench_step_variants.py`` time by default.

Not library code: the scripts beside it import it as a sibling module (``python
scripts/x.py`` puts ``scripts/`` on ``sys.path``), and nothing in the ``jaxformer`` package
does. The step itself is ``jaxformer bench``'s (``jaxformer.train.bench.compiled_step``).

Protocol: the worker process compiles the step, runs the warm-up steps and writes one JSON
line of facts ``{"params", "flops_per_token", "compile_s"}``; then for each line it reads it
runs one step and writes ``{"s": seconds, "loss", "faults": minor page faults during the
step, "maxrss_mib": the process's peak resident memory}``. ``read_reply`` and
``request_step`` are the client's side.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import IO, Any

# The GPT of docs/benchmarks.md (the side-by-side with Hugging Face): overrides on
# experiments/gpt_tiny.py.
BENCHMARK_GPT = ("model.n_layers=4", "model.d_model=256", "model.n_heads=4",
                 "model.vocab_size=8192", "data.seq_len=256", "model.max_len=256",
                 "train.batch_size=8")


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


def serve_steps(cfg: Any, warmup: int = 3, requests: IO[str] = sys.stdin,
                replies: IO[str] = sys.stdout) -> None:
    """The worker's side: compiles ``cfg``'s (a ``jaxformer.config.Config``) train step on a
    synthetic batch, runs ``warmup`` steps, writes the facts line, then one reply line per
    line read from ``requests`` (see the module docstring)."""
    # Imported here, not at the top: a script imports this module before it applies its
    # malloc settings (jaxformer.malloc_tuning), which must happen before JAX starts.
    from jaxformer.train.bench import compiled_step, timed_step
    from jaxformer.train.flops import count_params, flops_per_token

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
