"""The family of errors for bad input: what a command refuses before it does any work (a
setting out of range, a file it cannot use, a run it cannot start as asked). The message
is one line for the person who gave the input; the command line shows it as its one
``Error:`` line with exit code 2 (``chargpt.settings.InputError``, the click form).

A failure once the work has started is not bad input (``trainer.errors.RunError``).
"""

from __future__ import annotations


class BadInputError(Exception):
    """Input refused before any work was done; the message says what and why."""
