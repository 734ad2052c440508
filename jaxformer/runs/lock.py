"""One training process per run dir: an advisory lock on ``<run_dir>/.lock``.

The lock is ``fcntl.flock`` on an open file, so the kernel releases it when its holder exits
in any way (kill -9 included): a lock file left behind by a dead process is stale by
construction and is taken over, with a warning that names the old holder. The file records
who holds it (host, pid, start time) so that a refused second process can say who.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

from jaxformer.errors import UserError

LOCK_FILE = ".lock"


class RunDirLockedError(UserError):
    """Another live process trains in this run dir."""


class RunLock:
    """Held from ``acquire`` until ``release`` (or the process's end)."""

    def __init__(self, run_dir: Path, fd: int):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = fd

    @classmethod
    def acquire(cls, run_dir: Path, warn: Callable[[str], None] = print) -> RunLock:
        """Locks ``run_dir`` (which must exist) or raises RunDirLockedError naming the holder."""
        path = Path(run_dir) / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _describe(_read(fd))
            os.close(fd)
            raise RunDirLockedError(f"{run_dir} is in use by {holder}; wait for it to finish or "
                               "stop it, or use another --run-dir") from None
        previous = _read(fd)
        if previous and previous.get("pid") != os.getpid():
            warn(f"warning: took over the lock of {run_dir} left by {_describe(previous)}, "
                 "which is no longer running")
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        return cls(run_dir, fd)

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)  # an empty file: nobody holds it
        os.close(self.fd)  # closing releases the flock
        self.fd = None


def live_holder(run_dir: Path) -> dict | None:
    """The process that ``run_dir``'s lock file names when it is alive on this host (so the
    run is training now), else None: the file is absent or empty (released), names a process
    that has exited (a kill left it), or names another host, whose processes this cannot see.
    Reads the file only: it takes no lock, so it never stands in a starting trainer's way."""
    try:
        holder = json.loads((Path(run_dir) / LOCK_FILE).read_text() or "null")
    except (OSError, ValueError):
        return None
    if not isinstance(holder, dict) or holder.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(holder["pid"]), 0)  # signal 0: only whether the process exists
    except PermissionError:  # alive, owned by another user
        return holder
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return holder


def _read(fd: int) -> dict | None:
    try:
        data = os.pread(fd, 4096, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return None


def _describe(holder: dict | None) -> str:
    if not holder:
        return "another process"
    return (f"process {holder.get('pid')} on host {holder.get('host')} "
            f"(since {holder.get('since')})")
