"""Watching files for new versions by polling: the served checkpoint and the token file.

Polling a signature (inode, modification time, size) works on every filesystem and through
every kind of replacement: an atomic rename (a new inode), a rewrite in place (a new mtime)
and the symlink swaps that orchestrators use to publish secrets (``os.stat`` follows them).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

FileSignature = tuple[int, int, int]  # inode, mtime_ns, size


def file_signature(path: Path) -> FileSignature | None:
    """What changes whenever the file at ``path`` does; None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class Poller:
    """Calls ``check`` every ``seconds`` on a daemon thread of its own until stopped."""

    def __init__(self, name: str, check: Callable[[], object], seconds: float) -> None:
        self._check = check
        self._seconds = seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.wait(self._seconds):
            self._check()
