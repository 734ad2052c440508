"""The error type for mistakes a user can make."""


class UserError(Exception):
    """An error the user caused (bad config, missing data...).

    The CLI prints it as one ``error: ...`` line and exits with status 2.
    """
