"""The error types for mistakes a user can make and for runs that stop early on purpose.

The CLI prints any of them as one ``error: ...`` line and exits with its ``exit_status``
(documented in docs/usage.md, "Exit statuses").
"""

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 3
EXIT_PREEMPTED = 75  # sysexits.h EX_TEMPFAIL: "try again later" -- rerun the same command


class UserError(Exception):
    """An error the user caused (bad config, missing data...): exit status 2."""

    exit_status = EXIT_USER_ERROR


class DivergedError(UserError):
    """Training stopped after ``train.max_bad_steps`` non-finite steps in a row: exit 3."""

    exit_status = EXIT_DIVERGED


class PreemptedError(UserError):
    """Training stopped by SIGTERM or SIGINT after saving a checkpoint: exit 75."""

    exit_status = EXIT_PREEMPTED
