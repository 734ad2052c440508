"""Large CPU allocations on transparent huge pages, through glibc's ``malloc`` tunable.

XLA's CPU runtime allocates each step's temporaries afresh (hundreds of MB for a small model:
the [B·T, V] logits and their gradient alone are 2 × 67 MB at B·T = 2048, V = 8192). Blocks that
large come straight from ``mmap`` and go back on ``free``, so every step touches fresh 4 KiB
pages: about 110,000 page faults per step of the benchmark model, 15–35% of the CPU time spent
in the kernel. With ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc >= 2.35) malloc asks for
transparent huge pages on those blocks (``madvise(MADV_HUGEPAGE)``), 2 MiB pages: ~500 times
fewer faults. Measured on 2 CPU cores: the default experiment's step 0.81 → 0.69 s
(docs/benchmarks.md).

glibc reads tunables once, when the process starts, so the ``jaxformer`` command re-executes
itself with the variable set (same PID, arguments and file descriptors) before it imports
anything heavy. Nothing changes where it would not help: off Linux, on glibc older than 2.35,
when the kernel's transparent huge pages are ``never``, when the tunable is already set, or
when ``JAXFORMER_HUGEPAGES=0``.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

TUNABLE = "glibc.malloc.hugetlb=1"
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_at_least(version: str, wanted: tuple[int, int] = (2, 35)) -> bool:
    try:
        parts = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return len(parts) == 2 and parts >= wanted


def hugepage_env(environ: Mapping[str, str], system: str, libc: tuple[str, str],
                 thp_setting: str | None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when re-executing would not help.

    ``system``: ``platform.system()``; ``libc``: ``platform.libc_ver()``; ``thp_setting``: the
    text of /sys/kernel/mm/transparent_hugepage/enabled (None when absent), e.g.
    ``"always [madvise] never"``.
    """
    if environ.get("JAXFORMER_HUGEPAGES", "1") == "0" or system != "Linux":
        return None
    name, version = libc
    if name != "glibc" or not _glibc_at_least(version):
        return None
    if thp_setting is None or "[never]" in thp_setting:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None  # already set (by us before the exec, or by the user)
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{TUNABLE}" if current else TUNABLE
    return env


def reexec_with_hugepages(command: list[str]) -> None:
    """Replace this process by ``command`` (the same program again, e.g.
    ``[sys.executable, "-m", "jaxformer.cli", *sys.argv[1:]]``) with the tunable set, when
    ``hugepage_env`` says it helps; otherwise return and let the caller go on."""
    try:
        thp = THP_SETTING.read_text()
    except OSError:
        thp = None
    env = hugepage_env(os.environ, platform.system(), platform.libc_ver(), thp)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(command[0], command, env)
