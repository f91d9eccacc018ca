"""How a run fails: bad input before anything is written (exit 2), or a failure once it
runs (exit 3 for an I/O error, 4 for a diverged loss), whose message says what is intact."""

from __future__ import annotations


class TrainError(Exception):
    """A problem with the run's inputs, found before anything was written."""


class RunError(Exception):
    """The run stopped on a failure after it started; the message says what is intact."""

    exit_code = 3


class DivergedError(RunError):
    """The training loss or the weights became non-finite; nothing non-finite was saved."""

    exit_code = 4
