"""``chargpt`` that reports, as its interpreter starts to shut down, the native threads
still alive in the process (their names, from /proc/self/task), on stderr:

    python -m tests.threads_at_exit chargpt-args...

Under ``torchrun``, a gloo thread alive at that point can abort the process while the
interpreter finalizes ("terminate called without an active exception"): the process
group must be gone by then.
"""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path

from chargpt.cli import main

MARK = "threads at exit:"


def report() -> None:
    names = sorted(
        (task / "comm").read_text().strip() for task in Path("/proc/self/task").iterdir()
    )
    print(
        f"rank {os.environ.get('RANK', '0')} {MARK} {','.join(names)}", file=sys.stderr, flush=True
    )


if __name__ == "__main__":
    atexit.register(report)
    main(sys.argv[1:])
