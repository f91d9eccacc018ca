"""Stop sequences on a character stream, with hold-back.

Characters that might begin a stop sequence are held back until it is clear whether
they do; a matched stop sequence is never released.
"""

from __future__ import annotations

from typing import Generic, TypeVar

Item = TypeVar("Item")


class StopMatcher(Generic[Item]):
    """Feed characters (each with a payload); get back the ones safe to release."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self._held: list[tuple[str, Item]] = []
        self.matched: str | None = None

    def feed(self, char: str, item: Item) -> list[tuple[str, Item]]:
        """Add one character; returns what may be released now. After a match, ``matched``
        is set and the matching characters are dropped."""
        if self.matched is not None:
            raise RuntimeError("stop sequence already matched")
        self._held.append((char, item))
        # Every character of a stop sequence is held until it completes, so matching
        # against the held text is enough.
        held_text = "".join(c for c, _ in self._held)
        for stop in self.stops:
            if held_text.endswith(stop):
                self.matched = stop
                keep = len(self._held) - len(stop)
                released, self._held = self._held[:keep], []
                return released
        release_count = len(self._held) - self._pending_prefix_length(held_text)
        released, self._held = self._held[:release_count], self._held[release_count:]
        return released

    def flush(self) -> list[tuple[str, Item]]:
        """Everything still held (at the end of a generation that matched no stop)."""
        released, self._held = self._held, []
        return released

    def _pending_prefix_length(self, held_text: str) -> int:
        """Length of the longest tail of the held text that begins some stop sequence."""
        for n in range(len(held_text), 0, -1):
            tail = held_text[-n:]
            if any(stop.startswith(tail) for stop in self.stops):
                return n
        return 0
