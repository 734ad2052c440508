"""Heap reuse for CPU train steps (``JAXFORMER_MALLOC_TUNING=1``): glibc's ``mallopt`` at run
time, before JAX's backend starts."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from jaxformer import cli, malloc_tuning
from jaxformer.config import Config
from jaxformer.malloc_tuning import requested, tune_for_cpu_steps

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="glibc's mallopt only")


@pytest.mark.parametrize("value,wanted", [
    (None, False), ("0", False), ("", False), ("yes", False), ("1", True), (" 1\n", True)])
def test_opt_in_only(value, wanted):
    environ = {} if value is None else {"JAXFORMER_MALLOC_TUNING": value}
    assert requested(environ) is wanted


def test_not_requested_changes_nothing(monkeypatch):
    monkeypatch.setattr(malloc_tuning, "reuse_heap", lambda: pytest.fail("must not be called"))
    assert tune_for_cpu_steps({}) is False


def _python(code: str, **env: str) -> str:
    """Runs ``code`` in a fresh interpreter (glibc's state is per process); its stdout."""
    environ = {k: v for k, v in os.environ.items()
               if k not in ("GLIBC_TUNABLES", "JAXFORMER_MALLOC_TUNING")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**environ, **env},
                          capture_output=True, text=True, check=True).stdout


# Allocates and frees a 256 MiB block (above glibc's largest mmap threshold, and above the
# 64 MiB a thread's own arena can hold) ten times from a worker thread, touching every page,
# and prints the page faults that cost. ``TUNE`` is replaced by what runs before; with
# ``early`` the worker thread mallocs once before that (it gets its own arena first).
_ALLOC_LOOP = """
import ctypes, json, resource, threading
from jaxformer.malloc_tuning import reuse_heap
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
first, go = threading.Event(), threading.Event()
def work(early):
    if early:
        libc.free(libc.malloc(100))
        first.set()
        go.wait()
    n = 256 * 2**20
    for _ in range(10):
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
early = EARLY
t = threading.Thread(target=work, args=(early,))
if early:
    t.start(); first.wait()
applied = TUNE
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
if early:
    go.set()
else:
    t.start()
t.join()
print(json.dumps([applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before]))
"""


def _faults(tune: bool, thread_allocated_first: bool = False) -> int:
    code = _ALLOC_LOOP.replace("TUNE", "reuse_heap()" if tune else "None")
    applied, faults = json.loads(_python(code.replace("EARLY", str(thread_allocated_first))))
    assert applied is (True if tune else None)
    return faults


@needs_glibc
def test_a_freed_large_block_is_reused():
    """The effect itself: tuned, a worker thread's 256 MiB block is faulted in once and then
    reused; by default every malloc is a fresh mmap, faulted in again."""
    pages = 256 * 2**20 // resource.getpagesize()
    default, tuned = _faults(tune=False), _faults(tune=True)
    assert tuned < 1.5 * pages    # faulted in once (fewer faults where pages are huge)
    assert default > 5 * tuned    # faulted in again after every free


@needs_glibc
def test_too_late_for_a_thread_that_has_allocated():
    """Why it must run before JAX's backend starts its threads: a thread that has malloc'ed
    keeps its own arena, whose large blocks are mmap'ed whatever mallopt says."""
    pages = 256 * 2**20 // resource.getpagesize()
    assert _faults(tune=True, thread_allocated_first=True) > 5 * pages


@needs_glibc
def test_applies_before_the_backend_starts_and_not_after():
    early = ("import jax\nfrom jaxformer.malloc_tuning import tune_for_cpu_steps\n"
             "before = tune_for_cpu_steps()\njax.devices()\n"
             "print(before, tune_for_cpu_steps())")  # the second call: already in effect
    late = ("import jax\nfrom jaxformer.malloc_tuning import tune_for_cpu_steps\n"
            "jax.devices()\nprint(tune_for_cpu_steps())")
    assert _python(early, JAXFORMER_MALLOC_TUNING="1").split() == ["True", "True"]
    assert _python(late, JAXFORMER_MALLOC_TUNING="1").split() == ["False"]
    assert _python(early).split() == ["False", "False"]  # not requested


def test_too_late_says_so():
    code = ("import jax\nfrom jaxformer.malloc_tuning import tune_for_cpu_steps\n"
            "jax.devices()\ntune_for_cpu_steps()")
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    err = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**environ, "JAXFORMER_MALLOC_TUNING": "1"}, check=True).stderr
    assert "warning: JAXFORMER_MALLOC_TUNING=1 ignored" in err


@pytest.mark.parametrize("command", ["train", "bench"])
def test_train_and_bench_tune_before_they_start_jax(monkeypatch, tmp_path, command):
    """The commands that run steps ask for the tuning, before anything starts JAX."""
    calls = []
    monkeypatch.setattr(cli, "tune_for_cpu_steps", lambda: calls.append("tune"))
    def load(args):
        calls.append("load")
        return Config()

    monkeypatch.setattr(cli, "_load", load)
    from jaxformer.parallel import distributed
    from jaxformer.train import bench

    def starts_jax(*args, **kwargs):
        calls.append("jax")
        raise SystemExit(0)

    monkeypatch.setattr(distributed, "initialize", starts_jax)  # train's first JAX call
    monkeypatch.setattr(bench, "bench", starts_jax)
    with pytest.raises(SystemExit):
        cli.main([command, str(tmp_path / "x.py")])
    assert calls == ["load", "tune", "jax"]


@pytest.mark.parametrize("argv", [
    ["runs", "{tmp}"], ["plot", "--out", "{tmp}/x.png"], ["sample", "{tmp}/missing"],
    ["convert", "--from-hf", "{tmp}/missing", "--out", "{tmp}/out"]])
def test_other_commands_do_not_tune(monkeypatch, tmp_path, argv):
    monkeypatch.setattr(cli, "tune_for_cpu_steps", lambda: pytest.fail("must not tune"))
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == cli.EXIT_USER_ERROR


def test_command_errors_stay_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxformer.cli", "train",
                           str(tmp_path / "missing.py")], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "JAXFORMER_MALLOC_TUNING": "1"})
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: experiment file not found")
