"""Console progress: a live status line on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1000:.1f}k tok/s"


class Progress:
    """Step, loss, tokens/s and ETA. On a terminal one line is redrawn in place (at most
    ten times a second); elsewhere only ``log`` lines are written."""

    def __init__(self, total_steps: int, stream: TextIO | None = None) -> None:
        self.total_steps = total_steps  # 0: not known (a run with a time budget)
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self._last_draw = 0.0
        self._drawn = False

    def step_text(self, step: int) -> str:
        if not self.total_steps:
            return f"step {step}"
        return f"step {step:>{len(str(self.total_steps))}}/{self.total_steps}"

    def status(self, step: int, loss: float, tokens_per_s: float, eta_s: float) -> str:
        return (
            f"{self.step_text(step)} | loss {loss:.4f} | "
            f"{format_rate(tokens_per_s)} | ETA {format_duration(eta_s)}"
        )

    def update(
        self, step: int, fraction: float, loss: float, tokens_per_s: float, eta_s: float
    ) -> None:
        now = time.monotonic()
        if not self.interactive or now - self._last_draw < 0.1:
            return
        self._last_draw = now
        bar = "#" * int(20 * fraction)
        self.stream.write(f"\r[{bar:<20}] {self.status(step, loss, tokens_per_s, eta_s)}\x1b[K")
        self.stream.flush()
        self._drawn = True

    def log(self, line: str) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self._drawn = False
        self.stream.write(line + "\n")
        self.stream.flush()
