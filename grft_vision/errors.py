"""The library's exception types, and the "did you mean" hint its messages share.

Every error the library raises for bad input or an unusable environment derives from :class:`GRFTError`,
so that a command line can report them in one line while a genuine bug (any other exception) keeps its
traceback. Each also derives from the built-in type callers would naturally catch (``ValueError`` for bad
values, ``FileNotFoundError`` for missing data, ``RuntimeError`` for a run that cannot continue).
"""
from __future__ import annotations

import difflib
from typing import Iterable

__all__ = [
    "GRFTError",
    "ConfigError",
    "SelectionError",
    "AdapterError",
    "ModelLoadError",
    "DataNotFoundError",
    "TrainingError",
    "did_you_mean",
]


class GRFTError(Exception):
    """Base class of every error grft-vision raises on purpose; the message says what to do."""


class ConfigError(GRFTError, ValueError):
    """A configuration value or key is invalid; the message says which and what is accepted."""


class SelectionError(GRFTError, ValueError):
    """Scores, k or the selection data do not fit a layer; the message names the layer and the fix."""


class AdapterError(GRFTError, ValueError):
    """An adapter cannot be read, does not fit the model, or is used in a way it cannot be; the message says
    why and what to do."""


class ModelLoadError(GRFTError, RuntimeError):
    """The model or its weights cannot be created; the message says what to do instead."""


class DataNotFoundError(GRFTError, FileNotFoundError):
    """A dataset is missing or not prepared; the message says what was expected and how to get it.

    A subclass of :class:`FileNotFoundError`, so callers that already handle missing files keep working.
    """


class TrainingError(GRFTError, RuntimeError):
    """A run cannot continue (e.g. a non-finite or diverging loss); the message says where and what to try."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest of ``choices`` to ``name``, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""
