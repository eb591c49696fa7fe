"""The error raised when a dataset's files are not where a loader looks for them."""
from __future__ import annotations

from ..errors import DataNotFoundError

__all__ = ["DataNotFoundError"]
