"""Runs a Python snippet in a fresh interpreter with N fake CPU devices (XLA reads the device
count once, at start-up, so it cannot change inside the test process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_with_devices(script: str, n_devices: int = 8, timeout: int = 900) -> dict:
    """Runs ``script``; its last stdout line must be JSON, which is returned."""
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={n_devices}",
           "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    print(out.stdout)  # shown by pytest -s / on failure: the numbers behind the asserts
    return json.loads(out.stdout.strip().splitlines()[-1])
