"""How a run fails: bad input before anything is written (exit 2: a ``BadInputError``), or
a failure once it runs (exit 3 for an I/O error, 4 for a diverged loss), whose message
says what is intact."""

from __future__ import annotations

import errno
from pathlib import Path

from chargpt.errors import BadInputError


class SetupError(BadInputError):
    """The run cannot start as asked: its device, its run directory (a run there already,
    none to resume, one that --resume would change), its metrics port. Found before
    anything was written; beside it, ConfigError (its settings) and DataError (its text)."""


class RunError(Exception):
    """The run stopped on a failure after it started; the message says what is intact."""

    exit_code = 3


class DivergedError(RunError):
    """The training loss or the weights became non-finite; nothing non-finite was saved."""

    exit_code = 4


class WriteError(Exception):
    """Writing a file of the run failed (a full disk, an I/O error, a directory removed)."""

    def __init__(self, path: Path, cause: OSError, verb: str = "write") -> None:
        super().__init__(f"cannot {verb} {path}: {cause.strerror or cause}")
        self.path = path
        self.cause = cause


def failed_write(exc: WriteError, out_dir: Path, saved_step: int | None) -> RunError:
    """What failed and why, what is intact, and what to do. ``saved_step``: the step of
    the last checkpoint that landed in the run directory ``out_dir``."""
    if not out_dir.is_dir():
        return RunError(
            f"{exc} (the run directory {out_dir} is gone): nothing is left to resume; train again"
        )
    fix = {
        errno.ENOSPC: "free space",
        errno.EDQUOT: "free space",
        errno.EIO: "check the disk",
        errno.EROFS: "make it writable",
        errno.EACCES: "make it writable",
    }.get(exc.cause.errno or 0, "fix that")
    if saved_step is None:
        return RunError(
            f"{exc}; no checkpoint was saved yet: {fix} and train again with --overwrite"
        )
    return RunError(
        f"{exc}; the checkpoint of step {saved_step} is intact: {fix} and run again with --resume"
    )


def diverged(what: str, saved_step: int | None) -> DivergedError:
    """The error for a run whose loss or weights became non-finite: nothing is saved."""
    fix = "lower --learning-rate (or set --grad-clip)"
    if saved_step is None:
        return DivergedError(f"{what}; nothing was saved: {fix} and train again")
    return DivergedError(
        f"{what}; stopped without saving: the checkpoint of step {saved_step} is intact; "
        f"{fix} and run again with --resume"
    )
