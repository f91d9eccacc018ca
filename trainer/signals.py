"""SIGINT and SIGTERM during a run: a request to stop that the loop checks between steps;
once the loop is over, a signal cannot lose anything and changes no outcome."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import torch

from trainer.distributed import Distributed


class LateSignalError(Exception):
    """A signal that came once the loop had ended cuts a block short (the end-of-run sample)."""


class StopSignals:
    """SIGINT and SIGTERM, from ``install`` to ``uninstall``.

    While the loop runs, a signal is a request to stop (``received``), which the loop acts
    on between steps; all ranks must stop at the same step, and under DDP they agree by an
    all-reduce, which waits for the device, so only every ``interval`` steps (the run's
    ``SyncCadence.agree``) and at the last step. After ``loop_ended`` the run is saved
    whatever happens: a signal is only noted (``late``), and cuts short an
    ``interruptible`` block (the end-of-run sample).
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self.late: signal.Signals | None = None
        self._loop_over = False
        self._interruptible = False
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        if not self._loop_over:
            self.received = signal.Signals(signum)
            return
        self.late = signal.Signals(signum)
        if self._interruptible:
            self._interruptible = False
            raise LateSignalError(self.late.name)

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def loop_ended(self) -> None:
        self._loop_over = True

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block that a signal ends early by raising LateSignalError in it."""
        self._interruptible = True
        try:
            yield
        finally:
            self._interruptible = False

    def check(
        self, dist: Distributed, device: torch.device, step: int, last: bool, interval: int
    ) -> signal.Signals | None:
        """The signal to stop for after ``step`` (the run's ``last``?), once every rank
        knows of it (a rank that received none stops for another's, as for SIGTERM)."""
        if not dist.enabled:
            return self.received
        if step % interval and not last:
            return None
        if dist.any(self.received is not None, device):
            return self.received or signal.SIGTERM
        return None
