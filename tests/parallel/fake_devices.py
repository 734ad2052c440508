"""Runs a Python snippet in a fresh interpreter with N fake CPU devices (XLA reads the device
count once, at start-up, so it cannot change inside the test process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# For test subprocesses: LLVM's optimization level for the CPU code XLA emits (XLA's HLO passes,
# SPMD partitioning included, are unchanged). These tests check what a program computes and how
# it is partitioned, not how fast its machine code runs: unoptimized code compiles 2-4x faster,
# and a tiny model's steps, 2-3x slower, cost far less than that. Every process a test compares
# with another gets the same flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def compile_cache_env(directory: Path) -> dict[str, str]:
    """Environment variables that give test subprocesses JAX's persistent compilation cache in
    ``directory``: a process that compiles the same program as an earlier one (a relaunch, a
    rerun) loads the executable instead. The key is the program and the flags, so a process
    whose program differs still compiles its own."""
    return {"JAX_COMPILATION_CACHE_DIR": str(directory),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def run_with_devices(script: str, n_devices: int = 8, timeout: int = 900) -> dict:
    """Runs ``script``; its last stdout line must be JSON, which is returned."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices} "
           f"{FAST_COMPILE}", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    print(out.stdout)  # shown by pytest -s / on failure: the numbers behind the asserts
    return json.loads(out.stdout.strip().splitlines()[-1])
