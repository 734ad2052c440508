"""The ``jaxformer`` command as a user runs it, for the tests of its commands: a subprocess,
its one-line errors, and a fingerprint of a directory (to check that nothing in it changed)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENT = str(ROOT / "experiments" / "gpt_tiny.py")


def jaxformer(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``jaxformer ARGS`` in a fresh process (``python -m jaxformer.cli``); output captured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "jaxformer.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def snapshot(directory: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``directory``."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def assert_user_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit status 2, no traceback, one ``error: ...`` line holding every needle."""
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
