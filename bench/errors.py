"""The one exception type for everything a user can cause (bad input, missing data, ...).

The CLI turns a BenchError into its message on one line and exit status 2, never a traceback.
"""


class BenchError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one line for a user: a BenchError's message, else "Type: first line of the message",
    shortened to `limit` characters."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    if not isinstance(e, BenchError):
        text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
