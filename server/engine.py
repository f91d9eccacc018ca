"""The batching engine: one scheduler loop owns the models and all compute.

RPC handlers validate a request, ``submit`` it, and relay what the engine puts on the
request's event queue. Each iteration of the loop is three steps, in vLLM's shape:

- ``schedule``: retire cancelled and expiring requests, admit waiting ones (continuous
  batching: rows join and leave the running batch at every step), decide for each row
  whether it appends one position to its KV cache or recomputes a window
  (``server.served.decodes_from_cache``), and share the iteration's compute, counted in
  positions, between decoding (one position per cached row, a block per window row),
  prompt processing (chunked prefill) and a slice of pending ``Score`` work, so that
  neither long prompts nor long Scores starve the streams;
- ``execute``: the forward passes the plan names, per served model
  (``server/decoder.py``, which decides nothing), advancing each row's computed count;
- ``update``: sample every row's next character in one vectorised draw, release
  characters past stop-sequence hold-back, and finish what is done (Scores included).

Each request's state (status, computed positions, cached or not) lives on the request
(``server/requests.py``), as in vLLM; the decoder only owns cache slots.

A failure while sampling or streaming a row ends that row's request alone; a failed
forward pass ends the requests it computed (one model's decode batch, or its prompt
chunks of one step), never the other models' or a Score's. Each request
is pinned to the model that was current when it was submitted; a hot reload changes what
new requests get, never what a running generation uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from chargpt.sampling import sample
from server.metrics import ServerMetrics
from server.requests import (
    Event,
    EventQueue,
    FinishReason,
    GenerateParams,
    Generation,
    ScoreJob,
    ScoreParams,
    Status,
    TokenDetail,
)
from server.served import ServedModel, decodes_from_cache

log = logging.getLogger(__name__)

# Time kept in hand before a deadline, on top of three of the slowest recent iterations:
# the final message must still cross the event loop and the network.
RELAY_MARGIN_S = 0.1

T = TypeVar("T")


class OverloadedError(Exception):
    """Every running and waiting slot is taken."""


class EngineStoppedError(Exception):
    """The engine is shutting down."""


@dataclass(frozen=True)
class Budget:
    """How many positions an iteration computes besides decoding: as many as decoding
    does (so streams run at least half as fast beside prompts and Scores), at least
    ``min_extra``, and ``idle`` when nothing decodes."""

    min_extra: int = 32
    idle: int = 2048

    def extra(self, decode_positions: int) -> int:
        return max(decode_positions, self.min_extra) if decode_positions else self.idle


@dataclass
class StepPlan:
    """What one iteration computes, decided by ``schedule`` alone: the decoder executes it.

    ``decode``: rows that append their newest position to their KV cache (one position
    each); ``windows``: rows that recompute their last ``block_size`` characters (a model
    with the lecture's crop, past the block); ``prefill``: prompt chunks (row, positions);
    ``score``: a Score job and the positions its slice may use."""

    decode: list[Generation] = field(default_factory=list)
    windows: list[Generation] = field(default_factory=list)
    decode_positions: int = 0  # one per cached row, a block per window
    cached_rows: int = 0
    prefill: list[tuple[Generation, int]] = field(default_factory=list)
    score: tuple[ScoreJob, int] | None = None


@dataclass
class StepOutput:
    """What ``execute`` computed: each row that has next-character logits, and the
    Score slice's log-probabilities and positions."""

    rows: list[tuple[Generation, torch.Tensor]] = field(default_factory=list)
    score: tuple[ScoreJob, list[float], int] | None = None


def deliver_directly(batch: list[tuple[Generation, Event]]) -> None:
    for generation, event in batch:
        generation.events.put_nowait(event)


class Engine:
    """``deliver`` receives each iteration's events in one call (from the engine thread);
    the asyncio service hands them to its event loop in one wake-up.

    Threads: the loop thread (``run``, or a test calling ``step``) owns the running batch
    and every admitted request's state. RPC threads only submit, cancel (a flag the loop
    reads at its next ``schedule``), wake and read ``load``. One lock, ``_wake`` (a
    condition the loop sleeps on while there is nothing to do), guards everything both
    sides touch: the waiting queues ``_waiting`` and ``_scores``, ``_stopping``, and
    membership of ``_running``.
    """

    def __init__(
        self,
        metrics: ServerMetrics,
        max_running: int,
        max_waiting: int,
        budget: Budget = Budget(),
        deliver: Callable[[list[tuple[Generation, Event]]], None] = deliver_directly,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.metrics = metrics
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.budget = budget
        self.deliver = deliver
        self.clock = clock
        self._wake = threading.Condition()
        self._waiting: deque[Generation] = deque()
        self._scores: deque[ScoreJob] = deque()
        self._running: list[Generation] = []
        self._outbox: list[tuple[Generation, Event]] = []
        self._stopping = False
        self._slowest = 0.0  # the slowest recent iteration, decaying, for deadlines

    # ---- called from RPC threads -----------------------------------------------------

    def submit_generation(
        self, params: GenerateParams, served: ServedModel, events: EventQueue
    ) -> Generation:
        generation = Generation(params, served, events, received=self.clock())
        with self._wake:
            self._admit_check()
            self._waiting.append(generation)
            self._update_gauges()
            self._wake.notify()
        return generation

    def submit_score(self, params: ScoreParams, served: ServedModel) -> ScoreJob:
        job = ScoreJob(params, served, received=self.clock())
        with self._wake:
            self._admit_check()
            self._scores.append(job)
            self._update_gauges()
            self._wake.notify()
        return job

    def wake(self) -> None:
        with self._wake:
            self._wake.notify()

    def load(self) -> tuple[int, int]:
        """(running, waiting) requests."""
        with self._wake:
            return len(self._running), len(self._waiting) + len(self._scores)

    def request_stop(self) -> None:
        """Make ``run`` end the remaining requests (reason shutdown) and return."""
        with self._wake:
            self._stopping = True
            self._wake.notify()

    def _admit_check(self) -> None:
        if self._stopping:
            raise EngineStoppedError("the server is shutting down")
        waiting = len(self._waiting) + len(self._scores)
        if waiting >= self.max_waiting:
            raise OverloadedError(
                f"server is at capacity ({len(self._running)} running, {waiting} waiting); "
                "retry later"
            )

    def _update_gauges(self) -> None:
        self.metrics.running.set(len(self._running))
        self.metrics.waiting.set(len(self._waiting) + len(self._scores))
        self.metrics.batch_slots_used.set(len(self._running) / self.max_running)

    # ---- the loop --------------------------------------------------------------------

    def run(self) -> None:
        """The scheduler loop; returns after ``request_stop``."""
        while True:
            with self._wake:
                while not (self._running or self._waiting or self._scores or self._stopping):
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception:  # a bug outside any one row: fail this batch, keep serving
                log.exception("engine iteration failed; ending the running generations")
                for generation in list(self._running):
                    self._finish(generation, FinishReason.ERROR)
                self._flush()
        self._shutdown()

    def step(self) -> None:
        """One iteration: schedule, execute, update, then deliver its events."""
        started = self.clock()
        plan = self.schedule(started)
        output = self.execute(plan)
        self.update(output)
        self._flush()
        elapsed = self.clock() - started
        self._slowest = max(elapsed, 0.95 * self._slowest)
        if plan.decode or plan.windows:
            self.metrics.step_duration.observe(elapsed)
            self.metrics.batch_size.observe(len(plan.decode) + len(plan.windows))
            self.metrics.positions.labels("decode").inc(plan.cached_rows)
            self.metrics.positions.labels("window").inc(plan.decode_positions - plan.cached_rows)

    def _shutdown(self) -> None:
        with self._wake:
            for generation in list(self._running) + list(self._waiting):
                self._finish(generation, FinishReason.SHUTDOWN)
            self._waiting.clear()
            for job in self._scores:
                job.served.decoder.finish_score(job.id)
                job.result.set_exception(EngineStoppedError("the server is shutting down"))
            self._scores.clear()
        self._flush()

    def _flush(self) -> None:
        if self._outbox:
            batch, self._outbox = self._outbox, []
            self.deliver(batch)

    # ---- schedule --------------------------------------------------------------------

    def schedule(self, now: float) -> StepPlan:
        """Retire, admit, and decide for every running row what this iteration computes
        for it: one cached position, a recomputed window, or a prompt chunk."""
        margin = 3 * self._slowest + RELAY_MARGIN_S
        with self._wake:
            for generation in [g for g in self._waiting if g.cancelled or g.expiring(now, margin)]:
                self._waiting.remove(generation)
                self._finish(generation, _ended(generation))
            for generation in [g for g in self._running if g.cancelled or g.expiring(now, margin)]:
                self._finish(generation, _ended(generation))
            while self._waiting and len(self._running) < self.max_running:
                self._admit(self._waiting.popleft(), now)
            for job in [j for j in self._scores if j.cancelled]:
                self._drop_score(job)
                job.result.cancel()
            score = self._scores[0] if self._scores else None
            self._update_gauges()
        plan = StepPlan()
        prompts = []
        for generation in self._running:
            config = generation.served.config
            if generation.cached and not decodes_from_cache(config, len(generation.tokens)):
                # The text outgrew the block: from now on this row recomputes its window.
                generation.cached = False
                generation.served.decoder.release(generation.id)
            if not generation.cached:
                plan.windows.append(generation)
                plan.decode_positions += config.block_size
            elif generation.pending > 1:
                prompts.append((generation, generation.pending))
            else:
                plan.decode.append(generation)
                plan.decode_positions += 1
                plan.cached_rows += 1
        extra = self.budget.extra(plan.decode_positions)
        plan.prefill = self._share(prompts, extra)
        extra -= sum(p for _, p in plan.prefill)
        if score is not None and extra > 0:
            plan.score = (score, extra)
        return plan

    @staticmethod
    def _share(pending: list[tuple[Generation, int]], budget: int) -> list[tuple[Generation, int]]:
        """Prompt chunks in admission order while the budget lasts (the first always
        gets one, so a prompt longer than the budget still advances)."""
        chunks = []
        for generation, positions in pending:
            if budget <= 0 and chunks:
                break
            chunk = min(positions, max(budget, 1))
            chunks.append((generation, chunk))
            budget -= chunk
        return chunks

    def _admit(self, generation: Generation, now: float) -> None:
        if decodes_from_cache(generation.served.config, len(generation.tokens)):
            generation.served.decoder.start(generation)
            generation.cached = True
        generation.status = Status.RUNNING
        generation.admitted = now
        self._running.append(generation)
        self.metrics.queue_time.labels("Generate").observe(now - generation.received)
        self.metrics.prompt_characters.inc(len(generation.params.prompt_ids))

    # ---- execute ---------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepOutput:
        """The forward passes of the plan, per model; advances each row's computed count
        once its pass succeeded."""
        output = StepOutput()
        for chunks in _by_model(plan.prefill, lambda chunk: chunk[0]):
            try:
                logits = chunks[0][0].served.decoder.prefill(chunks)
            except Exception:
                for generation, _ in chunks:
                    self._fail(generation, "prompt processing")
                continue
            self.metrics.positions.labels("prompt").inc(sum(n for _, n in chunks))
            for (generation, count), row in zip(chunks, logits, strict=True):
                generation.computed += count
                if row is not None:
                    output.rows.append((generation, row))
        for group in _by_model(plan.decode, lambda generation: generation):
            try:
                logits = group[0].served.decoder.decode(group)
            except Exception:
                for generation in group:
                    self._fail(generation, "decoding")
                continue
            for generation in group:
                generation.computed = len(generation.tokens)
            output.rows.extend(zip(group, logits, strict=True))
        for group in _by_model(plan.windows, lambda generation: generation):
            try:
                logits = group[0].served.decoder.recompute(group)
            except Exception:
                for generation in group:
                    self._fail(generation, "decoding")
                continue
            output.rows.extend(zip(group, logits, strict=True))
        if plan.score is not None:
            output.score = self._score_slice(*plan.score)
        return output

    def _score_slice(self, job: ScoreJob, budget: int) -> tuple[ScoreJob, list[float], int] | None:
        if not job.started:
            job.started = True
            self.metrics.queue_time.labels("Score").observe(self.clock() - job.received)
        try:
            logprobs, positions = job.served.decoder.score(job, budget)
        except Exception as exc:
            log.exception("Score failed (%d characters, model step %d)",
                          len(job.params.ids), job.served.loaded.info.step)  # fmt: skip
            self._drop_score(job)
            job.result.set_exception(exc)
            return None
        return job, logprobs, positions

    def _drop_score(self, job: ScoreJob) -> None:
        job.served.decoder.finish_score(job.id)
        with self._wake:
            if job in self._scores:
                self._scores.remove(job)
            self._update_gauges()

    # ---- update ----------------------------------------------------------------------

    def update(self, output: StepOutput) -> None:
        """Sample every row at once, then stream and finish each; finish the Score whose
        slice completed it."""
        if output.score is not None:
            job, logprobs, positions = output.score
            job.logprobs.extend(logprobs)
            self.metrics.positions.labels("score").inc(positions)
            if job.done:
                self._drop_score(job)
                self.metrics.scored_characters.inc(len(job.logprobs))
                job.result.set_result(job.logprobs)
        rows = output.rows
        if not rows:
            return
        generations = [g for g, _ in rows]
        drawn = sample(
            torch.stack([logits for _, logits in rows]).float().cpu(),
            [g.params.sampling for g in generations],
            [g.params.seed for g in generations],
            [g.generated for g in generations],
        )
        tokens, failed = drawn.tokens.tolist(), drawn.failed.tolist()
        now = self.clock()
        for i, generation in enumerate(generations):
            if failed[i]:
                self._fail(generation, "sampling: the model gave non-finite logits", False)
                continue
            try:
                self._emit(generation, tokens[i], drawn.log_probs[i], now)
            except Exception:
                self._fail(generation, "emitting a character")
        self.metrics.generated_characters.inc(len(rows) - sum(failed))

    def _emit(
        self, generation: Generation, token: int, log_probs: torch.Tensor, now: float
    ) -> None:
        params = generation.params
        detail = None  # only a request that asks for logprobs gets per-character details
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
        chunk = generation.append(token, detail, generation.served.vocab[token])
        if chunk is not None:
            self._outbox.append((generation, chunk))
        reason = generation.finish_reason()
        if reason is not None:
            self._finish(generation, reason)

    def _fail(self, generation: Generation, stage: str, exc_info: bool = True) -> None:
        """End one request with an error (INTERNAL for its client), its neighbours untouched."""
        p = generation.params
        log.error(
            "generation %d failed in %s; it alone ends with INTERNAL (prompt %d chars, "
            "max_new_tokens %d, temperature %s, top_k %d, top_p %s, seed %d, %d generated)",
            generation.id, stage, len(p.prompt_ids), p.max_new_tokens, p.sampling.temperature,
            p.sampling.top_k, p.sampling.top_p, p.seed, generation.generated, exc_info=exc_info,
        )  # fmt: skip
        self._finish(generation, FinishReason.ERROR)

    def _finish(self, generation: Generation, reason: FinishReason) -> None:
        if generation.finished:
            return
        generation.status = Status.FINISHED
        if generation in self._running:
            with self._wake:
                self._running.remove(generation)
            if generation.cached:
                generation.served.decoder.release(generation.id)
        if reason in (FinishReason.LENGTH, FinishReason.TIME_LIMIT):
            held = generation.flush()
            if held is not None:
                self._outbox.append((generation, held))
        self._outbox.append((generation, generation.finished_event(reason, self.clock())))
        self.metrics.finished.labels(reason.value).inc()
        self.metrics.running.set(len(self._running))
        self.metrics.batch_slots_used.set(len(self._running) / self.max_running)


def _by_model(items: list[T], generation: Callable[[T], Generation]) -> list[list[T]]:
    """``items`` grouped by the model their generation is pinned to, in order."""
    groups: dict[int, list[T]] = {}
    for item in items:
        groups.setdefault(id(generation(item).served), []).append(item)
    return list(groups.values())


def _ended(generation: Generation) -> FinishReason:
    return FinishReason.CANCELLED if generation.cancelled else FinishReason.TIME_LIMIT
