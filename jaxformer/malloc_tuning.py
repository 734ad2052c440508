"""Reuse the heap across CPU train steps: glibc ``malloc`` tunables for XLA's CPU runtime.

XLA's CPU runtime allocates each step's temporaries afresh: one block of hundreds of MB for a
small model (415 MB for the benchmark GPT of docs/benchmarks.md, whose [B·T, V] logits and
their gradient alone are 2 × 67 MB) plus the step's outputs. glibc serves blocks that large
straight from ``mmap`` and returns them on ``free``, and worker threads' arenas do the same
for anything over 64 MB, so every step the kernel hands out, and first zeroes, fresh pages:
~110,000 page faults per step on 4 KiB pages and 10–17% of the CPU samples in the kernel's
page clearing (``perf``), even on 2 MiB huge pages.

With ``glibc.malloc.arena_max=1`` (one heap for all threads), ``glibc.malloc.mmap_max=0``
(large blocks from that heap, not from ``mmap``) and a ``trim_threshold`` of 16 GiB (freed
memory stays in the heap), later steps reuse the memory of earlier ones: no page faults and
no kernel time per step. Measured on 2 CPU cores with ``scripts/bench_malloc.py`` (steps of
the variants interleaved): 0.66 → 0.55 s per step against glibc's defaults. The price is
resident memory: the heap is never given back, and fragmentation can leave room for two or
three steps' temporaries (the benchmark GPT: 1.0 GB by default, 1.0–3.0 GB tuned, stable
after ~20 steps). Huge pages (``glibc.malloc.hugetlb=1``) cut the faults too, but each step
still waits for the kernel to find and zero 2 MiB pages, which stalls when memory is
fragmented (0.82 s per step in the same interleaved run). A second price: HF ``tokenizers``'
threads contend for the single arena (tokenizing the default corpus ~3.5x slower, once per
corpus, as tokens are cached); docs/usage.md.

glibc reads tunables once, when the process starts, so the ``jaxformer`` command re-executes
itself with them (same PID, arguments and file descriptors) before it imports anything heavy.
Nothing changes off Linux/glibc, where ``JAXFORMER_MALLOC_TUNING=0``, where the user's
``GLIBC_TUNABLES`` already sets any ``glibc.malloc.*`` tunable, or where an accelerator
plugin for JAX is installed: there the step's temporaries live in device memory, and one
malloc arena would serialise the host threads' allocations.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0",
            f"glibc.malloc.trim_threshold={16 * 2**30}")
# Modules of JAX's GPU and TPU plugins (the PJRT plugins live in the jax_plugins namespace).
ACCELERATOR_MODULES = ("jax_plugins", "jax_cuda12_plugin", "jax_cuda13_plugin",
                       "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def _glibc_at_least(version: str, wanted: tuple[int, int] = (2, 26)) -> bool:
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts >= wanted


def accelerator_installed(environ: Mapping[str, str]) -> bool:
    """Whether JAX may run on something other than the CPU: ``JAX_PLATFORMS`` names another
    platform, or (when it is unset) a GPU/TPU plugin module is importable. Imports nothing."""
    platforms = [p.strip() for p in environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    if platforms:
        return any(p != "cpu" for p in platforms)
    return any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_MODULES)


def malloc_env(environ: Mapping[str, str], system: str, libc: tuple[str, str],
               accelerator: bool) -> dict[str, str] | None:
    """The environment to re-execute with, or None when re-executing would not help.

    ``system``: ``platform.system()``; ``libc``: ``platform.libc_ver()`` (GLIBC_TUNABLES
    exists since glibc 2.26); ``accelerator``: ``accelerator_installed(environ)``.
    """
    if environ.get("JAXFORMER_MALLOC_TUNING", "1") == "0" or system != "Linux" or accelerator:
        return None
    name, version = libc
    if name != "glibc" or not _glibc_at_least(version):
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc." in current:
        return None  # set already: by us before the exec, or by the user
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(([current] if current else []) + list(TUNABLES))
    return env


def reexec_with_malloc_tuning(command: list[str]) -> None:
    """Replace this process by ``command`` (the same program again, e.g.
    ``[sys.executable, "-m", "jaxformer.cli", *sys.argv[1:]]``) with the tunables set, when
    ``malloc_env`` says it helps; otherwise return and let the caller go on."""
    env = malloc_env(os.environ, platform.system(), platform.libc_ver(),
                     accelerator_installed(os.environ))
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
