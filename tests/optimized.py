"""Long training runs for learning tests, in a child process whose XLA emits optimized CPU code.

The test processes compile with ``--xla_backend_optimization_level=0`` (tests/conftest.py): most
tests run a step or two, and unoptimized code compiles faster. A learning fixture runs hundreds
of steps, where the trade turns: the speech recognizer's step took 0.27 s unoptimized and
0.12 s optimized on 2 cores. ``train_optimized`` runs ``jaxformer.train.loop.train`` exactly as
a test would, in a fresh process with the flag removed (what a user's ``jaxformer train``
runs), and returns its ``TrainResult``."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

from jaxformer.config import Config
from jaxformer.train.loop import TrainResult
from tests.parallel.fake_devices import FAST_COMPILE

_CHILD = r"""
import pickle, sys
import jaxformer.objectives  # registers objective.kind's choices, as tests/conftest.py does
from jaxformer.train.loop import train
cfg, run_dir, out = pickle.loads(sys.stdin.buffer.read())
result = train(cfg, run_dir, progress=False, echo=lambda s: None)
with open(out, "wb") as f:
    pickle.dump(result, f)
"""


def train_optimized(cfg: Config, run_dir: Path, timeout: float = 1200) -> TrainResult:
    """``train(cfg, run_dir)`` in a child process with XLA's default (optimized) CPU backend."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "").replace(FAST_COMPILE, "").strip()
    out = Path(run_dir).parent / (Path(run_dir).name + ".result.pkl")
    proc = subprocess.run([sys.executable, "-c", _CHILD], input=pickle.dumps(
        (cfg, Path(run_dir), out)), env=env, capture_output=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"training in the child process failed ({proc.returncode}):\n"
                           f"{proc.stderr.decode()[-3000:]}")
    with open(out, "rb") as f:
        return pickle.load(f)
