"""ruff, as configured in pyproject.toml, is part of the test suite."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest


def test_ruff_is_clean():
    root = Path(__file__).resolve().parents[1]
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e '.[dev]'")
    out = subprocess.run([ruff, "check", "."], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]
