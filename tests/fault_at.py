"""``chargpt`` with a fault at a save point of the trainer.

    python -m tests.fault_at FILE STEP N ACTION chargpt-args...

The N-th time the trainer reaches the save point (FILE, STEP) (``trainer.state.save_point``:
just before STEP of writing FILE), ACTION happens: ``kill`` sends the process SIGKILL, so
it dies there as in a crash or an OOM kill, with no cleanup; an errno name (``ENOSPC``,
``EIO``) makes that step fail as on a full or failing disk.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

import trainer.state
from chargpt.cli import main

file, step, nth, action, argv = (
    sys.argv[1],
    sys.argv[2],
    int(sys.argv[3]),
    sys.argv[4],
    sys.argv[5:],
)
reached = 0


def fault_at(path: Path, at: str) -> None:
    global reached
    if (path.name, at) != (file, step):
        return
    reached += 1
    if reached != nth:
        return
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = getattr(errno, action)
    raise OSError(code, os.strerror(code), str(path))


trainer.state.save_point = fault_at
main(argv)
