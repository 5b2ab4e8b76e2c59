"""One exception type for every user-facing failure.

The CLI catches `SparsezipError` and prints its message as a single line with a
non-zero exit, so every message must tell the user what went wrong and what to do.
"""


class SparsezipError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""
