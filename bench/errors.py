"""The one exception type for everything a user can cause (bad input, missing data, ...).

The CLI turns a BenchError into its message on one line and exit status 2, never a traceback.
"""


class BenchError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""
