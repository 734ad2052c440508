"""``python -m tests.crash_train STEP jaxformer-args...``: the ``jaxformer`` command, but the
process exits hard (no clean-up, status 75) right after step STEP, once any checkpoint save in
flight is durable and TensorBoard is flushed: a reproducible stand-in for a killed job."""

from __future__ import annotations

import functools
import os
import sys

from jaxformer import cli
from jaxformer.train import loop

CRASH_EXIT_CODE = 75


class CrashAfter:
    """A train-loop hook that kills the process after ``step``."""

    def __init__(self, step: int):
        self.step = step

    def after_step(self, run: loop.Run, step: int, metrics: dict) -> None:
        if step == self.step:
            run.ckpt.wait()
            run.reporter.flush()  # what a crash loses is what was never flushed
            os._exit(CRASH_EXIT_CODE)


def main() -> None:
    step, argv = int(sys.argv[1]), sys.argv[2:]
    loop.train = functools.partial(loop.train, hooks=[CrashAfter(step)])
    sys.exit(cli.main(argv))


if __name__ == "__main__":
    main()
