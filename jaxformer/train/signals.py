"""Signals a scheduler or a user sends to a training job, turned into requests the step loop
acts on between steps (never in the middle of one, never lost).

- SIGTERM (SLURM, Kubernetes, TPU maintenance) and SIGINT (Ctrl-C): finish the current step,
  save a checkpoint, exit with status 75 (``errors.PreemptedError``). A watchdog ends the
  process with status 128 + signal number if that takes longer than ``checkpoint.grace_period``
  seconds, and a second SIGTERM/SIGINT ends it at once the same way: the run then resumes
  from its last periodic checkpoint.
- SIGUSR1 (SLURM ``--signal=USR1@60``): save a checkpoint after the current step and go on.

A handler only records the request: Python runs it between bytecodes of the main thread, so a
KeyboardInterrupt raised there could land inside any library call (and one in 13 Ctrl-Cs was
swallowed that way). With several processes, the requests are combined at log steps
(``agree``), so that every process stops or saves at the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType

import numpy as np

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SAVE_SIGNALS = (signal.SIGUSR1,)


class SignalRequests:
    """Installs the handlers on ``__enter__`` (main thread only) and restores the previous
    ones on ``__exit__``. ``stop`` / ``save`` hold the pending requests."""

    def __init__(self, grace_period: float, say: Callable[[str], None] = print):
        self.grace_period = grace_period
        self.say = say
        self.stop: int | None = None  # the signal number that asked to stop
        self.save = False
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None

    def __enter__(self) -> SignalRequests:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS + SAVE_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if signum in SAVE_SIGNALS:
            self.save = True
            _note(f"{name}: a checkpoint will be saved after this step")
            return
        if self.stop is not None:  # the second one: leave now, as asked twice
            _note(f"{name} again: exiting now without saving (status {128 + signum})")
            os._exit(128 + signum)
        self.stop = signum
        _note(f"{name}: saving a checkpoint after this step, then exiting (status 75); "
              f"send it again to exit at once")
        self._watchdog = threading.Timer(self.grace_period, _give_up, (signum,
                                                                        self.grace_period))
        self._watchdog.daemon = True
        self._watchdog.start()

    def agree(self, step: int, every: int) -> tuple[int | None, bool]:
        """-> (stop signal or None, save?) as every process sees it. With one process the
        requests stand as they are; with several they are combined (a collective) at steps
        that are multiples of ``every``, and held until then."""
        import jax

        if jax.process_count() == 1:
            return self.stop, self.save
        if step % every:
            return None, False
        from jax.experimental import multihost_utils

        mine = np.array([self.stop or 0, int(self.save)], np.int32)
        everyone = np.asarray(multihost_utils.process_allgather(mine))
        stop = int(everyone[:, 0].max())
        return (stop or None), bool(everyone[:, 1].max())


def _note(line: str) -> None:
    # Straight to the file descriptor: a handler must not wait on a lock print may hold.
    os.write(sys.stderr.fileno(), f"\n{line}\n".encode())


def _give_up(signum: int, grace_period: float) -> None:
    _note(f"the checkpoint was not saved within checkpoint.grace_period={grace_period:g}s: "
          f"exiting without it (status {128 + signum}); the run resumes from its last "
          "periodic checkpoint")
    os._exit(128 + signum)
