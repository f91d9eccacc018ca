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
import os
import re
import sys
from pathlib import Path
from typing import Any

import torch.distributed

from chargpt.cli import main

AFTER_DESTROY, AT_EXIT = "after destroy_process_group", "at exit"
# One report: <<threads RANK MOMENT: NAME,NAME>>, delimited because torchrun can join the
# ranks' output mid-line.
REPORT = re.compile(r"<<threads (\d+) ([a-z_ ]+): ([^>]*)>>")


def report(moment: str) -> None:
    names = sorted(
        (task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()
    )
    rank = os.environ.get("RANK", "0")
    print(f"<<threads {rank} {moment}: {','.join(names)}>>", file=sys.stderr, flush=True)


def destroy_then_report(*args: Any, **kwargs: Any) -> None:
    destroy(*args, **kwargs)
    report(AFTER_DESTROY)


if __name__ == "__main__":
    destroy = torch.distributed.destroy_process_group
    torch.distributed.destroy_process_group = destroy_then_report
    atexit.register(report, AT_EXIT)
    main(sys.argv[1:])
