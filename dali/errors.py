"""The one error type of a user's mistake. ``dali`` prints it as ``dali <command>: error: <message>`` and exits
with status 2, as argparse does; any other exception is a bug and keeps its traceback."""

from __future__ import annotations

import reprlib


class DaliError(Exception):
    """A wrong flag, file, folder or input: the message names it and says what to do."""


class ModelLoadError(DaliError, FileNotFoundError):
    """A model (LLaVA, its vision tower) cannot be loaded from the given id or folder."""


class TrainingDiverged(DaliError, FloatingPointError):
    """Too many training steps had a NaN or infinite loss (a learning rate too high, bad inputs)."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, cut to about ``limit`` characters without building the whole text first: a value printed in
    an error message costs no more than that, whatever it holds (a 5000-digit number, a list expanded from YAML
    aliases)."""
    short = reprlib.Repr()
    short.maxstring = short.maxlong = short.maxother = limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 6
    short.maxlevel = 2
    try:
        text = short.repr(value)
    except ValueError:  # an integer past Python's 4300-digit conversion limit
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else text[: limit - 3] + "..."
