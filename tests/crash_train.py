"""``python -m tests.crash_train STEP[:SIGNAL[:PROCESS]] jaxformer-args...``: the
``jaxformer`` command with a fault after step STEP.

- ``STEP``: the process exits hard (no clean-up, status 86) right after step STEP, once any
  checkpoint save in flight is durable and TensorBoard is flushed: a reproducible stand-in for
  a killed job.
- ``STEP:SIGTERM:1``: process 1 of the job (any process when omitted) sends itself SIGTERM
  after step STEP, as a scheduler preempting one host would.
"""

from __future__ import annotations

import functools
import os
import signal
import sys

import jax

from jaxformer import cli
from jaxformer.train import loop

CRASH_EXIT_CODE = 86  # not 75: that is a preempted run (checkpoint saved)


class CrashAfter:
    """A train-loop hook that kills the process after ``step``."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, run: loop.Run, step: int, metrics: dict) -> None:
        if step == self.step:
            run.ckpt.wait()
            run.reporter.flush()  # what a crash loses is what was never flushed
            os._exit(CRASH_EXIT_CODE)


class SignalAfter:
    """A train-loop hook: process ``process`` (None: every one) signals itself after
    ``step``."""

    def __init__(self, step: int, sig: int, process: int | None):
        self.step, self.sig, self.process = step, sig, process

    def after_step(self, run: loop.Run, step: int, metrics: dict) -> None:
        if step == self.step and self.process in (None, jax.process_index()):
            os.kill(os.getpid(), self.sig)


def main() -> None:
    spec, argv = sys.argv[1].split(":"), sys.argv[2:]
    step = int(spec[0])
    hook = (CrashAfter(step) if len(spec) == 1 else
            SignalAfter(step, signal.Signals[spec[1]], int(spec[2]) if len(spec) > 2 else None))
    loop.train = functools.partial(loop.train, hooks=[hook])
    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
