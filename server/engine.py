"""The batching engine: one scheduler thread owns the models and all compute.

RPC handlers validate a request, ``submit`` it, and relay what the engine puts on the
request's event queue. Between decode steps the loop drops cancelled and expiring
requests, admits waiting ones (continuous batching: rows join and leave the running batch
at every step), runs one slice of pending ``Score`` work, then decodes one character for
every running generation. Each generation owns its random generator and samples from its
own row of logits, so its text does not depend on its neighbours.

Each request is pinned to the model that was current when it was submitted; a hot reload
changes what new requests get, never what a running generation uses.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

import torch

from chargpt.checkpoint import LoadedModel
from chargpt.sampling import SamplingParams, sample_with_log_probs
from server.decoder import Decoder
from server.metrics import ServerMetrics
from server.stops import StopMatcher

log = logging.getLogger(__name__)
DEADLINE_MARGIN_S = 0.05


class OverloadedError(Exception):
    """Every running and waiting slot is taken."""


class EngineStoppedError(Exception):
    """The engine is shutting down."""


@dataclass
class ServedModel:
    """A verified model on its device, with its serving forward passes."""

    loaded: LoadedModel
    path: str
    device: torch.device
    dtype: torch.dtype
    loaded_at: float
    decoder: Decoder

    @property
    def block_size(self) -> int:
        return self.loaded.info.config.block_size


@dataclass(frozen=True)
class GenerateParams:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int
    stop: list[str]
    logprobs: bool = False
    top_logprobs: int = 0
    deadline: float | None = None  # time.monotonic() value


@dataclass(frozen=True)
class TokenDetail:
    id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class Chunk:
    """Characters released to the client (stop-sequence hold-back already applied)."""

    text: str
    tokens: list[TokenDetail]


@dataclass(frozen=True)
class Finished:
    reason: str  # length, stop, time_limit, cancelled, shutdown
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
    received: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    admitted: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    generated: int = 0
    slot: int | None = None  # KV-cache slot while the context fits the window
    cached: int = 0  # positions whose keys and values are in the slot
    context: list[int] = field(default_factory=list)  # the last block_size ids
    length: int = 0  # characters of prompt + generated text
    finished: bool = False

    def __post_init__(self) -> None:
        self.context = self.params.prompt_ids[-self.served.block_size :]
        self.length = len(self.params.prompt_ids)
        self.generator = torch.Generator().manual_seed(self.params.seed)
        self.matcher: StopMatcher[TokenDetail] = StopMatcher(self.params.stop)

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class ScoreJob:
    """One Score request: log p(ids[i] | window) for i in [first_target, len(ids))."""

    served: ServedModel
    ids: list[int]
    first_target: int
    received: float = field(default_factory=time.monotonic)
    result: Future[list[float]] = field(default_factory=Future)
    cancelled: bool = False
    next_target: int = 0
    logprobs: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.next_target = self.first_target

    def cancel(self) -> None:
        self.cancelled = True


def deliver_directly(batch: list[tuple[Generation, Event]]) -> None:
    for generation, event in batch:
        generation.events.put_nowait(event)


class Engine:
    """``deliver`` receives the events of each step in one call (from the engine thread);
    the asyncio service hands them to its event loop in one wake-up."""

    def __init__(
        self,
        metrics: ServerMetrics,
        max_running: int = 64,
        max_waiting: int = 256,
        score_windows_per_step: int = 32,
        deliver: Callable[[list[tuple[Generation, Event]]], None] = deliver_directly,
    ) -> None:
        self.metrics = metrics
        self.deliver = deliver
        self._outbox: list[tuple[Generation, Event]] = []
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.score_windows_per_step = score_windows_per_step
        self._wake = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._scores: deque[ScoreJob] = deque()
        self._running: list[Generation] = []
        self._stopping = False
        self._step_seconds = 0.0  # moving average, for deadline decisions
        self._thread: threading.Thread | None = None

    # ---- called from RPC threads -------------------------------------------------

    def start(self) -> None:
        """Run the loop on a background thread (tests, embedding). ``chargpt serve`` runs it
        on the main thread instead: libgomp recreates its worker threads for every parallel
        region entered from a non-main thread, which made small decode steps 4x slower."""
        self._thread = threading.Thread(target=self.run, name="engine", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Make ``run`` end the remaining requests (reason "shutdown") and return."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join()

    def submit_generation(
        self, params: GenerateParams, served: ServedModel, events: EventQueue | None = None
    ) -> Generation:
        generation = Generation(
            params, served, events if events is not None else queue.SimpleQueue()
        )
        with self._wake:
            self._admit_check()
            self._waiting.append(generation)
            self.metrics.waiting.set(len(self._waiting) + len(self._scores))
            self._wake.notify()
        return generation

    def submit_score(self, ids: list[int], first_target: int, served: ServedModel) -> ScoreJob:
        job = ScoreJob(served, ids, first_target)
        with self._wake:
            self._admit_check()
            self._scores.append(job)
            self.metrics.waiting.set(len(self._waiting) + len(self._scores))
            self._wake.notify()
        return job

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._wake:
            return len(self._running), len(self._waiting) + len(self._scores)

    def _admit_check(self) -> None:
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        if len(self._waiting) + len(self._scores) >= self.max_waiting:
            raise OverloadedError(
                f"server is at capacity ({len(self._running)} running, "
                f"{len(self._waiting) + len(self._scores)} waiting); retry later"
            )

    # ---- the scheduler thread ----------------------------------------------------

    def run(self) -> None:
        """The scheduler loop; returns after ``request_stop``."""
        while True:
            with self._wake:
                while not (self._running or self._waiting or self._scores or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
                self._admit()
                score = self._scores[0] if self._scores else None
            try:
                self._retire_cancelled_and_expiring()
                if score is not None:
                    self._score_slice(score)
                if self._running:
                    self._decode_step()
            except Exception:  # a bug must not kill the loop and hang every client
                log.exception("engine step failed; failing the running requests")
                for generation in list(self._running):
                    self._finish(generation, "error")
            self._flush_outbox()
        for generation in list(self._running) + list(self._waiting):
            self._finish(generation, "shutdown")
        self._flush_outbox()
        for job in self._scores:
            job.result.set_exception(EngineStoppedError("the server is shutting down"))

    def _flush_outbox(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self.deliver(batch)

    def _admit(self) -> None:
        """Move waiting generations into the running batch (lock held)."""
        now = time.monotonic()
        for generation in [g for g in self._waiting if g.cancelled or self._expiring(g, now)]:
            self._waiting.remove(generation)
            self._finish(generation, "cancelled" if generation.cancelled else "time_limit")
        while self._waiting and len(self._running) < self.max_running:
            generation = self._waiting.popleft()
            generation.admitted = now
            if generation.length < generation.served.block_size:
                generation.slot = generation.served.decoder.cache.allocate()
            self._running.append(generation)
            self.metrics.queue_time.labels("Generate").observe(now - generation.received)
            self.metrics.prompt_characters.inc(len(generation.params.prompt_ids))
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._waiting) + len(self._scores))

    def _expiring(self, generation: Generation, now: float) -> bool:
        """Whether the deadline would pass before another step and the final message got
        out (the margin covers a step, a thread switch and gRPC's send)."""
        deadline = generation.params.deadline
        return deadline is not None and deadline - now < 3 * self._step_seconds + DEADLINE_MARGIN_S

    def _retire_cancelled_and_expiring(self) -> None:
        now = time.monotonic()
        for generation in list(self._running):
            if generation.cancelled:
                self._finish(generation, "cancelled")
            elif self._expiring(generation, now):
                self._release_held(generation)
                self._finish(generation, "time_limit")

    def _decode_step(self) -> None:
        started = time.monotonic()
        rows = list(self._running)
        by_model: dict[int, list[int]] = {}
        for i, generation in enumerate(rows):
            by_model.setdefault(id(generation.served), []).append(i)
        all_logits: list[torch.Tensor | None] = [None] * len(rows)
        for indices in by_model.values():
            decoder = rows[indices[0]].served.decoder
            cached = [i for i in indices if self._uses_cache(rows[i])]
            windows = [i for i in indices if not self._uses_cache(rows[i])]
            if cached:
                logits = (
                    decoder.forward_cached(
                        [rows[i].context[-1] for i in cached],
                        [rows[i].length - 1 for i in cached],
                        [rows[i].slot for i in cached],  # type: ignore[misc]
                    )
                    .float()
                    .cpu()
                )
                for j, i in enumerate(cached):
                    all_logits[i] = logits[j]
                    rows[i].cached = rows[i].length
            if windows:
                fill = [rows[i].slot for i in windows]
                logits = (
                    decoder.forward_windows([rows[i].context for i in windows], fill).float().cpu()
                )
                for j, i in enumerate(windows):
                    all_logits[i] = logits[j]
                    if rows[i].slot is not None:
                        rows[i].cached = rows[i].length
        now = time.monotonic()
        for generation, row_logits in zip(rows, all_logits, strict=True):
            assert row_logits is not None
            self._emit(generation, row_logits, now)
        elapsed = time.monotonic() - started
        self._step_seconds = (
            0.9 * self._step_seconds + 0.1 * elapsed if self._step_seconds else elapsed
        )
        self.metrics.step_duration.observe(elapsed)
        self.metrics.batch_size.observe(len(rows))

    @staticmethod
    def _uses_cache(generation: Generation) -> bool:
        """Whether the row can decode its newest character from the KV cache."""
        return generation.slot is not None and generation.cached == generation.length - 1

    def _emit(self, generation: Generation, logits: torch.Tensor, now: float) -> None:
        params = generation.params
        token, log_probs = sample_with_log_probs(logits, params.sampling, generation.generator)
        detail = TokenDetail(token, 0.0, [])
        if params.logprobs:
            top: list[tuple[int, float]] = []
            if params.top_logprobs:
                values, ids = torch.topk(log_probs, min(params.top_logprobs, len(log_probs)))
                top = list(zip(ids.tolist(), values.tolist(), strict=True))
            detail = TokenDetail(token, float(log_probs[token]), top)
        if generation.first_token is None:
            generation.first_token = now
            self.metrics.time_to_first_token.observe(now - generation.received)
        else:
            self.metrics.inter_token_latency.observe(now - (generation.last_token or now))
        generation.last_token = now
        generation.generated += 1
        generation.length += 1
        generation.context.append(token)
        block_size = generation.served.block_size
        if len(generation.context) > block_size:
            del generation.context[0]
        if generation.slot is not None and generation.length > block_size:
            generation.served.decoder.cache.release(generation.slot)  # windows from now on
            generation.slot = None
        self.metrics.generated_characters.inc()

        char = generation.served.loaded.tokenizer.vocab[token]
        released = generation.matcher.feed(char, detail)
        if released:
            self._outbox.append((generation, self._chunk(released)))
        if generation.matcher.matched is not None:
            self._finish(generation, "stop")
        elif generation.generated >= params.max_new_tokens:
            self._release_held(generation)
            self._finish(generation, "length")

    @staticmethod
    def _chunk(released: list[tuple[str, TokenDetail]]) -> Chunk:
        return Chunk("".join(c for c, _ in released), [d for _, d in released])

    def _release_held(self, generation: Generation) -> None:
        released = generation.matcher.flush()
        if released:
            self._outbox.append((generation, self._chunk(released)))

    def _finish(self, generation: Generation, reason: str) -> None:
        if generation.finished:
            return
        generation.finished = True
        if generation in self._running:
            self._running.remove(generation)
        if generation.slot is not None:
            generation.served.decoder.cache.release(generation.slot)
            generation.slot = None
        now = time.monotonic()
        admitted = generation.admitted if generation.admitted is not None else now
        first = generation.first_token if generation.first_token is not None else now
        self._outbox.append(
            (
                generation,
                Finished(
                    reason=reason,
                    stop_sequence=generation.matcher.matched or "",
                    prompt_characters=len(generation.params.prompt_ids),
                    generated_characters=generation.generated,
                    seed=generation.params.seed,
                    queue_seconds=admitted - generation.received,
                    time_to_first_token_seconds=first - generation.received,
                    total_seconds=now - generation.received,
                    model=generation.served,
                ),
            )
        )
        self.metrics.finished.labels(reason).inc()
        self.metrics.running.set(len(self._running))

    def _score_slice(self, job: ScoreJob) -> None:
        """Score the next slice of ``job``; finish it when done (keeps decode steps short)."""
        if job.cancelled:
            self._pop_score(job)
            job.result.cancel()
            return
        if job.next_target == job.first_target:
            self.metrics.queue_time.labels("Score").observe(time.monotonic() - job.received)
        decoder = job.served.decoder
        block_size = job.served.block_size
        ids, n = job.ids, len(job.ids)
        if job.next_target <= block_size:
            # Targets whose window starts at 0 all come from one causal forward.
            end = min(n, block_size + 1)
            with torch.inference_mode():
                logits, _ = decoder.model(torch.tensor([ids[: end - 1]], device=decoder.device))
            log_probs = torch.log_softmax(logits[0].float(), dim=-1).cpu()
            targets = range(job.next_target, end)
            job.logprobs.extend(float(log_probs[i - 1, ids[i]]) for i in targets)
            job.next_target = end
        else:
            end = min(n, job.next_target + self.score_windows_per_step)
            windows = [ids[i - block_size : i] for i in range(job.next_target, end)]
            log_probs = torch.log_softmax(decoder.forward_windows(windows).float(), dim=-1).cpu()
            job.logprobs.extend(
                float(log_probs[j, ids[i]]) for j, i in enumerate(range(job.next_target, end))
            )
            job.next_target = end
        if job.next_target >= n:
            self._pop_score(job)
            self.metrics.scored_characters.inc(n - job.first_target)
            job.result.set_result(job.logprobs)

    def _pop_score(self, job: ScoreJob) -> None:
        with self._wake:
            self._scores.remove(job)
            self.metrics.waiting.set(len(self._waiting) + len(self._scores))
