"""The data pipeline's error type."""

from jaxformer.errors import UserError


class DataError(UserError):
    """Bad data input: a missing path, unreadable files, too little data for the sequence..."""
