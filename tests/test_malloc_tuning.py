"""The ``jaxformer`` command's re-exec with glibc's heap-reuse malloc tunables."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from jaxformer.malloc_tuning import TUNABLES, accelerator_installed, malloc_env

ROOT = Path(__file__).resolve().parents[1]
GLIBC = ("glibc", "2.36")
SET = ":".join(TUNABLES)


def test_sets_the_tunables_on_linux_glibc_cpu():
    assert malloc_env({"PATH": "/bin"}, "Linux", GLIBC, False) == {
        "PATH": "/bin", "GLIBC_TUNABLES": SET}
    assert SET == ("glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:"
                   "glibc.malloc.trim_threshold=17179869184")


def test_keeps_other_tunables():
    env = malloc_env({"GLIBC_TUNABLES": "glibc.cpu.x86_shstk=off"}, "Linux", GLIBC, False)
    assert env["GLIBC_TUNABLES"] == f"glibc.cpu.x86_shstk=off:{SET}"


@pytest.mark.parametrize("environ,system,libc,accelerator", [
    ({"JAXFORMER_MALLOC_TUNING": "0"}, "Linux", GLIBC, False),         # opted out
    ({}, "Darwin", ("", ""), False),                                    # not Linux
    ({}, "Linux", ("glibc", "2.17"), False),                            # no GLIBC_TUNABLES yet
    ({}, "Linux", ("", ""), False),                                     # musl or unknown libc
    ({}, "Linux", GLIBC, True),                                         # GPU/TPU plugin
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=8"}, "Linux", GLIBC, False),  # user's own
    ({"GLIBC_TUNABLES": SET}, "Linux", GLIBC, False),                   # already re-executed
])
def test_no_reexec_where_it_would_not_help(environ, system, libc, accelerator):
    assert malloc_env(environ, system, libc, accelerator) is None


def test_accelerator_detection_follows_jax_platforms():
    assert accelerator_installed({"JAX_PLATFORMS": "cuda"})
    assert accelerator_installed({"JAX_PLATFORMS": "cpu,tpu"})
    assert not accelerator_installed({"JAX_PLATFORMS": "cpu"})


def _this_machine_reexecs(environ) -> bool:
    return malloc_env(environ, platform.system(), platform.libc_ver(),
                      accelerator_installed(environ)) is not None


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items()
            if k not in ("GLIBC_TUNABLES", "JAXFORMER_MALLOC_TUNING")}


def test_reexec_keeps_arguments_and_sets_the_variable():
    code = ("import sys; sys.argv = ['probe', 'a b', '--x=1'];"
            "from jaxformer.malloc_tuning import reexec_with_malloc_tuning;"
            "reexec_with_malloc_tuning([sys.executable, '-m', 'tests.malloc_probe',"
            " *sys.argv[1:]]); print('{\"same process\": 1}')")
    env = _clean_env()
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    if _this_machine_reexecs(env):
        assert got == {"tunables": SET, "argv": ["a b", "--x=1"]}
    else:
        assert got == {"same process": 1}


# Allocates and frees a 256 MiB block (above glibc's largest mmap threshold) from a worker
# thread ten times, touching every page, and prints the page faults that cost.
_ALLOC_LOOP = """
import ctypes, json, resource, threading
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def work():
    n = 256 * 2**20
    for _ in range(10):
        p = libc.malloc(n)
        ctypes.memset(p, 1, n)
        libc.free(p)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
t = threading.Thread(target=work); t.start(); t.join()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc tunables only")
def test_tunables_make_a_freed_large_block_reusable():
    """The effect itself: with the tunables, a worker thread's 256 MiB block is faulted in
    once and then reused; by default every malloc is a fresh mmap, faulted in again."""
    def faults(tunables: str | None) -> int:
        env = _clean_env()
        if tunables is not None:
            env["GLIBC_TUNABLES"] = tunables
        out = subprocess.run([sys.executable, "-c", _ALLOC_LOOP], env=env, capture_output=True,
                             text=True, check=True).stdout
        return json.loads(out)

    pages = 256 * 2**20 // resource.getpagesize()
    default, tuned = faults("glibc.malloc.hugetlb=0"), faults(SET)
    assert tuned < 1.5 * pages    # faulted in once (fewer faults where pages are huge)
    assert default > 5 * tuned    # faulted in again after every free


def test_command_errors_survive_the_reexec(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxformer.cli", "train",
                           str(tmp_path / "missing.py")], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: experiment file not found")
