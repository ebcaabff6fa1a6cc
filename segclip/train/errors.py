"""Errors a user can fix; the CLI prints them as one message (no traceback)."""


class DataError(Exception):
    """A dataset or input file that cannot be used as given; the message names the path and what
    was expected."""
