"""Reuse the heap across CPU train steps: glibc ``malloc`` settings for XLA's CPU runtime,
opt-in with ``JAXFORMER_MALLOC_TUNING=1``.

XLA's CPU runtime allocates each step's temporaries afresh: one block of hundreds of MB for a
small model (415 MB for the benchmark GPT of docs/benchmarks.md, whose [B·T, V] logits and
their gradient alone are 2 × 67 MB) plus the step's outputs. glibc serves blocks that large
straight from ``mmap`` and returns them on ``free``, and worker threads' arenas do the same
for anything over 64 MB, so every step the kernel hands out, and first zeroes, fresh pages:
~100,000 page faults per step on 4 KiB pages and 10–17% of the CPU samples in the kernel's
page clearing (``perf``), even on 2 MiB huge pages.

``reuse_heap`` sets, through glibc's ``mallopt``, one arena for every thread that has not
allocated yet (``M_ARENA_MAX`` 1), large blocks from that heap rather than ``mmap``
(``M_MMAP_MAX`` 0) and no trimming (``M_TRIM_THRESHOLD`` -1): later steps reuse the memory of
earlier ones, with no page faults and no kernel time per step: 15–18% shorter steps on 2 cores
(docs/benchmarks.md, "CPU train steps: reusing the heap").

Why opt-in, and why before JAX starts (both measured with ``scripts/bench_malloc.py``):

* A thread keeps the arena of its first ``malloc``. JAX's CPU backend starts the threads that
  run the steps when it initializes (``jax.devices()``, ``jax.default_backend()``), so the
  settings only work when applied before that; applied later, each step still takes ~100,000
  page faults. The backend cannot be asked whether it is a CPU without starting it, and on a
  GPU or TPU host one shared arena could serialise the host threads' allocations for the whole
  process (an arena limit cannot be lifted again; not measured, for want of a GPU). Only the
  user knows the run is a CPU run.
* The prices: resident memory (the heap is never given back, and fragmentation can hold room
  for two or three steps' temporaries: 1.0–3.0 GB against 1.0 GB for the benchmark GPT), and
  HF ``tokenizers``, whose threads then contend for the single arena (training a tokenizer
  and tokenizing a corpus for the first time up to ~3.5× slower on 2 quiet cores; tokens are
  cached). Commands other than ``train`` and ``bench`` never pay them.

Nothing changes off Linux/glibc.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Mapping

ENV = "JAXFORMER_MALLOC_TUNING"
# glibc's <malloc.h> parameter numbers and the values set: one arena, no mmap for large blocks,
# never trim (-1 is the documented "disable trimming" value of M_TRIM_THRESHOLD).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))
_applied = False  # by tune_for_cpu_steps, in this process


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the user asked for heap reuse: ``JAXFORMER_MALLOC_TUNING=1``."""
    return environ.get(ENV, "0").strip() == "1"


def reuse_heap() -> bool:
    """Applies ``SETTINGS`` with glibc's ``mallopt``; returns whether glibc accepted them all
    (False off Linux/glibc, where nothing is changed). Affects the threads that have not
    allocated yet, and the main thread."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all(mallopt(param, value) == 1 for param, value in SETTINGS)


def jax_backend_started() -> bool:
    """Whether JAX has created its backends, and with them the threads that run the steps.
    Does not import JAX."""
    if "jax" not in sys.modules:
        return False
    try:
        from jax._src import xla_bridge
    except ImportError:
        return False
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started()) if started is not None else False


def tune_for_cpu_steps(environ: Mapping[str, str] = os.environ) -> bool:
    """Heap reuse for the CPU train steps of this process, when ``JAXFORMER_MALLOC_TUNING=1``.

    Call it before JAX initializes its backend (before any ``jax.devices()``, computation or
    ``jax.distributed.initialize``): ``jaxformer train`` and ``jaxformer bench`` call it first
    thing. Returns whether the settings are in effect: True when applied by this call or an
    earlier one; False when not requested, off Linux/glibc, or when JAX's backend had already
    started (too late to help; a warning says so).
    """
    global _applied
    if not requested(environ):
        return False
    if _applied:
        return True
    if jax_backend_started():
        print(f"warning: {ENV}=1 ignored: JAX's backend has started already, and its threads "
              "keep their malloc arenas", file=sys.stderr)
        return False
    _applied = reuse_heap()
    return _applied
