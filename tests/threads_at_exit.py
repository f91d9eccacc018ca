"""``chargpt`` that reports the native threads alive in the process (their names, from
/proc/self/task), on stderr, right after ``destroy_process_group`` and as its interpreter
starts to shut down:

    python -m tests.threads_at_exit chargpt-args...

Under ``torchrun``, gloo's threads must end with the process group: one still running
while the interpreter finalizes can abort the process ("terminate called without an
active exception"), and a group released later by DDP, the GIL held, can deadlock.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch.distributed

from chargpt.cli import main

AFTER_DESTROY, AT_EXIT = "after destroy_process_group", "at exit"
# One report: <<threads RANK MOMENT: NAME,NAME>>, delimited because torchrun can join the
# ranks' output mid-line.
REPORT = re.compile(r"<<threads (\d+) ([a-z_ ]+): ([^>]*)>>")


def thread_names() -> list[str]:
    names = []
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # it ended while we listed it
            names.append((task / "comm").read_text().strip())
    return sorted(names)


def report(moment: str) -> None:
    names = thread_names()
    rank = os.environ.get("RANK", "0")
    print(f"<<threads {rank} {moment}: {','.join(names)}>>", file=sys.stderr, flush=True)


def destroy_then_report(*args: Any, **kwargs: Any) -> None:
    destroy(*args, **kwargs)
    # Once (CI, a busy machine) gloo's loop thread was still listed here and gone at exit:
    # most likely the group's last reference dropped on another thread just after destroy
    # returned (not confirmed). So wait for it to end by itself. A group something else
    # still holds (DDP releasing it later) never ends while this thread waits here, and
    # is reported after the bound.
    deadline = time.monotonic() + 60
    while "gloo" in ",".join(thread_names()) and time.monotonic() < deadline:
        time.sleep(0.05)
    report(AFTER_DESTROY)


if __name__ == "__main__":
    destroy = torch.distributed.destroy_process_group
    torch.distributed.destroy_process_group = destroy_then_report
    atexit.register(report, AT_EXIT)
    main(sys.argv[1:])
