"""Exceptions that the command line turns into one-line error messages."""

from __future__ import annotations

from os import PathLike


class Qid2Error(Exception):
    """An error the user can act on; printed as one line, exit status 1."""


class InputError(Qid2Error):
    """A problem with one input file.

    Parameters
    ----------
    path : str or PathLike or None
        The offending file (named first in the message).
    message : str
        What is wrong with it, in one sentence.

    """

    def __init__(self, path: str | PathLike | None, message: str):
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class GradientError(InputError):
    """An invalid or inconsistent gradient table (.bval/.bvec/.b)."""


class EngineUnavailableError(Qid2Error):
    """The requested up-sampling engine cannot run in this installation."""
