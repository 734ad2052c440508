"""The ``jaxformer`` command's re-exec with glibc's huge-page malloc tunable."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from jaxformer.hugepages import THP_SETTING, TUNABLE, hugepage_env

ROOT = Path(__file__).resolve().parents[1]
GLIBC = ("glibc", "2.36")
MADVISE = "always [madvise] never"


def test_sets_the_tunable_on_linux_glibc_with_thp():
    env = hugepage_env({"PATH": "/bin"}, "Linux", GLIBC, MADVISE)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    assert hugepage_env({}, "Linux", GLIBC, "[always] madvise never")["GLIBC_TUNABLES"] == TUNABLE


def test_keeps_other_tunables():
    env = hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "Linux", GLIBC, MADVISE)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}"


@pytest.mark.parametrize("environ,system,libc,thp", [
    ({"JAXFORMER_HUGEPAGES": "0"}, "Linux", GLIBC, MADVISE),       # opted out
    ({}, "Darwin", ("", ""), None),                                  # not Linux
    ({}, "Linux", ("glibc", "2.31"), MADVISE),                       # tunable unknown before 2.35
    ({}, "Linux", ("", ""), MADVISE),                                # musl or unknown libc
    ({}, "Linux", GLIBC, "always madvise [never]"),                  # THP off in the kernel
    ({}, "Linux", GLIBC, None),                                      # no THP at all
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "Linux", GLIBC, MADVISE),  # user's choice
    ({"GLIBC_TUNABLES": TUNABLE}, "Linux", GLIBC, MADVISE),          # already re-executed
])
def test_no_reexec_where_it_would_not_help(environ, system, libc, thp):
    assert hugepage_env(environ, system, libc, thp) is None


def _this_machine_reexecs(environ) -> bool:
    thp = THP_SETTING.read_text() if THP_SETTING.exists() else None
    return hugepage_env(environ, platform.system(), platform.libc_ver(), thp) is not None


def test_reexec_keeps_arguments_and_sets_the_variable():
    code = ("import sys; sys.argv = ['probe', 'a b', '--x=1'];"
            "from jaxformer.hugepages import reexec_with_hugepages;"
            "reexec_with_hugepages([sys.executable, '-m', 'tests.hugepages_probe',"
            " *sys.argv[1:]]); print('{\"same process\": 1}')")
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES",
                                                           "JAXFORMER_HUGEPAGES")}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    got = json.loads(out.strip().splitlines()[-1])
    if _this_machine_reexecs(env):
        assert got == {"tunables": TUNABLE, "argv": ["a b", "--x=1"]}
    else:
        assert got == {"same process": 1}


def test_command_errors_survive_the_reexec(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "jaxformer.cli", "train",
                           str(tmp_path / "missing.py")], cwd=tmp_path, capture_output=True,
                          text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert proc.stderr.startswith("error: experiment file not found")
