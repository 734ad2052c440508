"""kill -9 at a random moment (scripts/fault_injection.py, one trial here: each costs two
fresh processes; the numbers for many are in docs/reliability.md): the rerun starts from the
newest finished checkpoint and ends bitwise where the uninterrupted run ends."""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

import pytest

from tests.parallel.fake_devices import compile_cache_env

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "fault_injection.py"


def test_random_kill_points_resume_bitwise(tmp_path, monkeypatch):
    # The three training processes (reference, killed, rerun) inherit this environment (the
    # session's unoptimized-code flags, tests/conftest.py), and the killed run and the rerun
    # load the reference's executables from the cache (the same programs: the killed run only
    # reads entries, so no kill lands in a write; an unreadable entry would only be compiled
    # again).
    for key, value in compile_cache_env(tmp_path / "jax-cache").items():
        monkeypatch.setenv(key, value)
    spec = importlib.util.spec_from_file_location("fault_injection", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fault_injection"] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    lines: list[str] = []
    trials = module.run_trials(tmp_path, kills=1, steps=12, every=2, seed=1, say=lines.append)
    assert [t.bitwise for t in trials] == [True], "\n".join(lines)
    assert lines[-1].startswith("1/1 resumed bitwise")
    # The kill landed while the run trained (not after it ended).
    assert all(t.killed_exit == -signal.SIGKILL for t in trials), "\n".join(lines)
