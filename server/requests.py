"""What the engine tracks per request, and the events it hands back to the service.

A ``Generation`` owns its state as vLLM's ``Request`` does: its text so far (prompt and
generated ids), its status, how many of its positions are computed into its KV cache and
whether it decodes from that cache at all (the engine's schedule decides; the engine
advances the count after each forward pass), the stop-sequence matcher and its timings.
The decoder owns only where the keys and values are (its cache slots).
"""

from __future__ import annotations

import itertools
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from chargpt.sampling import SamplingParams
from server.served import ServedModel
from server.stops import StopMatcher

_ids = itertools.count()


class FinishReason(StrEnum):
    """Why a generation ended: the metric label, and (for the first three) the summary's
    ``finish_reason``; the others end the stream with an error status or no message."""

    LENGTH = "length"
    STOP = "stop"
    TIME_LIMIT = "time_limit"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"
    ERROR = "error"


class Status(StrEnum):
    """Where a generation is in the engine: queued, in the running batch, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class GenerateParams:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    characters_per_message: int = 1  # the floor of each streamed message (stream interval)
    max_characters_per_message: int = 0  # the ceiling; 0: none
    deadline: float | None = None  # on the engine's clock


@dataclass(frozen=True)
class ScoreParams:
    """Score ``ids[first_target:]``, each given everything before it."""

    ids: list[int]
    first_target: int
    context_characters: int


@dataclass(frozen=True)
class TokenDetail:
    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Chunk:
    """Characters released to the client (stop-sequence hold-back already applied), and
    each one's details if the request asked for logprobs (else none)."""

    text: str
    tokens: list[TokenDetail]


@dataclass(frozen=True)
class Finished:
    reason: FinishReason
    stop_sequence: str
    prompt_characters: int
    generated_characters: int
    seed: int
    queue_seconds: float
    time_to_first_token_seconds: float
    total_seconds: float
    model: ServedModel


Event = Chunk | Finished


class EventQueue(Protocol):
    """Where a generation's events go: a ``queue.SimpleQueue`` or an ``asyncio.Queue``."""

    def put_nowait(self, item: Event, /) -> None: ...


@dataclass(eq=False)
class Generation:
    """One Generate request as the engine tracks it."""

    params: GenerateParams
    served: ServedModel
    events: EventQueue
    received: float
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)  # prompt ids, then generated ids
    status: Status = Status.WAITING
    # Positions of ``tokens`` whose keys and values are in the row's cache slot (vLLM's
    # num_computed_tokens), and whether it has one: False for a row of a model with the
    # lecture's crop whose text outgrew the block (each step recomputes the window).
    computed: int = 0
    cached: bool = False
    cancelled: bool = False  # set by the RPC side; the engine loop acts on it
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None

    def __post_init__(self) -> None:
        self.tokens = list(self.params.prompt_ids)
        self.matcher: StopMatcher[TokenDetail | None] | None = (
            StopMatcher(self.params.stop) if self.params.stop else None
        )

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.params.prompt_ids)

    @property
    def finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def pending(self) -> int:
        """Positions to compute before the next character: 1 for a row that decodes one
        position, more for a prompt still being processed."""
        return len(self.tokens) - self.computed

    def cancel(self) -> None:
        self.cancelled = True

    def expiring(self, now: float, margin: float) -> bool:
        """Whether the deadline is closer than ``margin``: time to send the final message."""
        deadline = self.params.deadline
        return deadline is not None and deadline - now < margin

    def append(self, token: int, detail: TokenDetail | None, char: str) -> Chunk | None:
        """Add a generated character (with its details when the request asked for
        logprobs); returns what may be streamed now."""
        self.tokens.append(token)
        if self.matcher is None:
            return Chunk(char, [detail] if detail is not None else [])
        released = self.matcher.feed(char, detail)
        return _chunk(released) if released else None

    def flush(self) -> Chunk | None:
        """Whatever the stop matcher still holds back (at the end of the generation)."""
        released = self.matcher.flush() if self.matcher is not None else []
        return _chunk(released) if released else None

    @property
    def stop_sequence(self) -> str:
        """The stop sequence that ended the generation, or ''."""
        return (self.matcher.matched if self.matcher is not None else None) or ""

    def finish_reason(self) -> FinishReason | None:
        """LENGTH or STOP once the latest character ended the generation, else None."""
        if self.stop_sequence:
            return FinishReason.STOP
        if self.generated >= self.params.max_new_tokens:
            return FinishReason.LENGTH
        return None

    def finished_event(self, reason: FinishReason, now: float) -> Finished:
        admitted = self.admitted if self.admitted is not None else now
        first = self.first_token if self.first_token is not None else now
        return Finished(
            reason=reason,
            stop_sequence=self.stop_sequence,
            prompt_characters=len(self.params.prompt_ids),
            generated_characters=self.generated,
            seed=self.params.seed,
            queue_seconds=admitted - self.received,
            time_to_first_token_seconds=first - self.received,
            total_seconds=now - self.received,
            model=self.served,
        )


def _chunk(released: list[tuple[str, TokenDetail | None]]) -> Chunk:
    return Chunk("".join(c for c, _ in released), [d for _, d in released if d is not None])


@dataclass(eq=False)
class ScoreJob:
    """One Score request; ``logprobs`` fills in slices until every target is scored."""

    params: ScoreParams
    served: ServedModel
    received: float
    id: int = field(default_factory=lambda: next(_ids))
    result: Future[list[float]] = field(default_factory=Future)
    cancelled: bool = False
    started: bool = False
    logprobs: list[float] = field(default_factory=list)

    @property
    def ids(self) -> list[int]:
        return self.params.ids

    @property
    def first_target(self) -> int:
        return self.params.first_target

    @property
    def next_target(self) -> int:
        return self.params.first_target + len(self.logprobs)

    @property
    def done(self) -> bool:
        return self.next_target >= len(self.params.ids)

    def cancel(self) -> None:
        self.cancelled = True
