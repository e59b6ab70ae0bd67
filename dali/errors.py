"""The one error type of a user's mistake. ``dali`` prints it as ``dali <command>: error: <message>`` and exits
with status 2, as argparse does; any other exception is a bug and keeps its traceback."""

from __future__ import annotations


class DaliError(Exception):
    """A wrong flag, file, folder or input: the message names it and says what to do."""


class ModelLoadError(DaliError, FileNotFoundError):
    """A model (LLaVA, its vision tower) cannot be loaded from the given id or folder."""


class TrainingDiverged(DaliError, FloatingPointError):
    """Too many training steps had a NaN or infinite loss (a learning rate too high, bad inputs)."""
