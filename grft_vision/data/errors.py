"""The error raised when a dataset's files are not where a loader looks for them."""
from __future__ import annotations

__all__ = ["DataNotFoundError"]


class DataNotFoundError(FileNotFoundError):
    """A dataset is missing or not prepared; the message says what was expected and how to get it.

    A subclass of :class:`FileNotFoundError`, so callers that already handle missing files keep working.
    """
