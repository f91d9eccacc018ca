"""Engine policy in process: a fake decoder with fixed logits (nanochat's mock-model idea)
and an injected clock. No sockets, no threads unless the test is about the loop, no
sleeps."""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import torch

from chargpt.checkpoint import CheckpointInfo, LoadedModel
from chargpt.model import GPT, GPTConfig, reference_generate
from chargpt.sampling import SamplingParams
from chargpt.tokenizer import CharTokenizer
from server.decoder import Decoder
from server.engine import (
    RELAY_MARGIN_S,
    Budget,
    Engine,
    EngineStoppedError,
    OverloadedError,
)
from server.metrics import ServerMetrics
from server.requests import Chunk, Finished, FinishReason, GenerateParams, ScoreParams
from server.served import Decoder as DecoderProtocol
from server.served import Row, ScoreWork, ServedModel

VOCAB = ("\n", "a", "b", "c")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeDecoder:
    """Always prefers ``favourite`` (logit 5, the rest 0); records what it computed.
    Prompts are processed in chunks; a row ``poisoned`` gets NaN logits."""

    favourite: int = 1
    poisoned: set[int] = field(default_factory=set)
    broken: bool = False
    slots: set[int] = field(default_factory=set)
    decoded: list[list[int]] = field(default_factory=list)
    prefilled: list[tuple[int, int]] = field(default_factory=list)
    scored: list[int] = field(default_factory=list)
    released: list[int] = field(default_factory=list)
    slow_score: tuple[Clock, float] | None = None  # each Score slice moves this clock on

    def logits(self, seq_id: int) -> torch.Tensor:
        row = torch.zeros(len(VOCAB))
        row[self.favourite] = 5.0
        return row.fill_(float("nan")) if seq_id in self.poisoned else row

    def start(self, seq: Row) -> None:
        self.slots.add(seq.id)

    def release(self, seq_id: int) -> None:
        self.released.append(seq_id)
        self.slots.remove(seq_id)

    def prefill(self, chunks: Sequence[tuple[Row, int]]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        for seq, count in chunks:
            assert seq.id in self.slots and 1 <= count <= len(seq.tokens) - seq.computed
            self.prefilled.append((seq.id, count))
            done = seq.computed + count == len(seq.tokens)
            out.append(self.logits(seq.id) if done else None)
        return out

    def decode(self, seqs: Sequence[Row]) -> torch.Tensor:
        if self.broken:
            raise RuntimeError("this model's forward pass is broken")
        assert all(s.id in self.slots and s.computed == len(s.tokens) - 1 for s in seqs)
        self.decoded.append([s.id for s in seqs])
        return torch.stack([self.logits(s.id) for s in seqs])

    def recompute(self, seqs: Sequence[Row]) -> torch.Tensor:
        if self.broken:
            raise RuntimeError("this model's forward pass is broken")
        assert not any(s.id in self.slots for s in seqs)
        self.decoded.append([s.id for s in seqs])
        return torch.stack([self.logits(s.id) for s in seqs])

    def score(self, job: ScoreWork, budget: int) -> tuple[list[float], int]:
        if self.broken:
            raise RuntimeError("this model's forward pass is broken")
        if self.slow_score is not None:
            clock, seconds = self.slow_score
            clock.now += seconds
        end = min(len(job.ids), job.next_target + budget)
        self.scored.append(end - job.next_target)
        return [-1.0] * (end - job.next_target), end - job.next_target

    def finish_score(self, job_id: int) -> None:
        pass


def served(
    decoder: DecoderProtocol, step: int = 1, block_size: int = 1024, model: GPT | None = None
) -> ServedModel:
    """A served model around ``decoder``; its block (1024 unless told) is longer than any
    text these tests make, so every row decodes from its cache unless a test says so."""
    config = GPTConfig(vocab_size=len(VOCAB), block_size=block_size, n_embd=8, n_head=1, n_layer=1)
    model = model if model is not None else GPT(config)
    info = CheckpointInfo(model.config, VOCAB, step, None, None, "", "test")
    loaded = LoadedModel(model, CharTokenizer(VOCAB), info, f"sha{step}")
    return ServedModel(loaded, "model.safetensors", torch.device("cpu"), torch.float32, 0.0,
                       decoder)  # fmt: skip


def params(prompt: list[int] | None = None, n: int = 3, **kwargs: object) -> GenerateParams:
    kwargs.setdefault("sampling", SamplingParams(temperature=0))
    return GenerateParams(prompt or [0], n, seed=0, **kwargs)  # type: ignore[arg-type]


def events(q: queue.SimpleQueue) -> list[Chunk | Finished]:  # type: ignore[type-arg]
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


@pytest.fixture
def clock() -> Clock:
    return Clock()


def engine(clock: Clock, max_running: int = 8, max_waiting: int = 8, **kwargs: object) -> Engine:
    return Engine(ServerMetrics(), max_running, max_waiting, clock=clock, **kwargs)  # type: ignore[arg-type]


def test_a_generation_streams_then_finishes_with_its_summary(clock: Clock) -> None:
    e, model, q = engine(clock), served(FakeDecoder(favourite=2)), queue.SimpleQueue()
    generation = e.submit_generation(params(n=3), model, q)
    for _ in range(3):
        clock.now += 0.01
        e.step()
    got = events(q)
    assert [c.text for c in got if isinstance(c, Chunk)] == ["b", "b", "b"]
    summary = got[-1]
    assert isinstance(summary, Finished) and summary.reason == FinishReason.LENGTH
    assert summary.generated_characters == 3 and summary.model is model
    assert summary.time_to_first_token_seconds == pytest.approx(0.01)
    assert generation.finished and model.decoder.released == [generation.id]


def test_admission_and_overload(clock: Clock) -> None:
    e, model = engine(clock, max_running=1, max_waiting=1), served(FakeDecoder())
    first = e.submit_generation(params(n=100), model, queue.SimpleQueue())
    e.step()  # first runs
    second = e.submit_generation(params(n=2), model, queue.SimpleQueue())
    with pytest.raises(OverloadedError, match="capacity"):
        e.submit_generation(params(), model, queue.SimpleQueue())
    e.step()
    assert e.load() == (1, 1) and second.admitted is None
    first.cancel()
    e.step()  # first leaves, second joins the batch in the same iteration
    assert first.finished and second.admitted == clock.now
    assert model.decoder.decoded[-1] == [second.id]


def test_cancellation_frees_the_row_within_one_step(clock: Clock) -> None:
    e, decoder = engine(clock), FakeDecoder()
    model, q = served(decoder), queue.SimpleQueue()
    keep = e.submit_generation(params(n=100), model, queue.SimpleQueue())
    gone = e.submit_generation(params(n=100), model, q)
    e.step()
    gone.cancel()
    e.step()
    assert decoder.decoded[-1] == [keep.id] and gone.id in decoder.released
    finished = events(q)[-1]
    assert isinstance(finished, Finished) and finished.reason == FinishReason.CANCELLED


def test_a_deadline_ends_the_generation_while_the_final_message_can_be_sent(clock: Clock) -> None:
    e, model, q = engine(clock), served(FakeDecoder()), queue.SimpleQueue()
    generation = e.submit_generation(
        params(n=1000, stop=["ab"], deadline=clock.now + 1.0), model, q
    )
    e.step()
    clock.now += 1.0 - RELAY_MARGIN_S / 2  # closer to the deadline than the margin
    e.step()
    finished = events(q)[-1]
    assert isinstance(finished, Finished) and finished.reason == FinishReason.TIME_LIMIT
    assert generation.finished and finished.generated_characters == 1


def test_the_deadline_margin_grows_with_the_slowest_iteration(clock: Clock) -> None:
    # An iteration that scores for 0.5 s: the next one keeps 3 x 0.5 s + RELAY_MARGIN_S in
    # hand, so a generation 1.5 s from its deadline ends now, its final message in time.
    decoder = FakeDecoder(slow_score=(clock, 0.5))
    e, model, q = (
        engine(clock, budget=Budget(min_extra=4, idle=4)),
        served(decoder),
        queue.SimpleQueue(),
    )
    e.submit_score(ScoreParams([0] * 1000, 1, 0), model)
    e.step()  # the Score's slice alone: 0.5 s
    generation = e.submit_generation(params(n=1000, deadline=clock.now + 1.5), model, q)
    e.step()
    finished = events(q)[-1]
    assert isinstance(finished, Finished) and finished.reason == FinishReason.TIME_LIMIT
    assert generation.finished  # (1.5 s left < 3 x 0.5 s + RELAY_MARGIN_S)


def test_running_generations_are_decoded_together(clock: Clock) -> None:
    decoder = FakeDecoder()
    e, model = engine(clock, max_running=16, max_waiting=16), served(decoder)
    for _ in range(12):
        e.submit_generation(params(n=5), model, queue.SimpleQueue())
    for _ in range(6):
        e.step()
    assert max(map(len, decoder.decoded)) == 12  # one batch of every running row


def test_held_back_stop_prefixes_are_released_at_the_end(clock: Clock) -> None:
    e, model, q = engine(clock), served(FakeDecoder(favourite=1)), queue.SimpleQueue()
    e.submit_generation(params(n=2, stop=["aab"]), model, q)  # "aa" could begin "aab"
    e.step()
    e.step()
    got = events(q)
    assert "".join(c.text for c in got if isinstance(c, Chunk)) == "aa"
    assert got[-1].reason == FinishReason.LENGTH  # type: ignore[union-attr]


def test_each_generation_keeps_the_model_it_started_with(clock: Clock) -> None:
    e, old, new = engine(clock), served(FakeDecoder(favourite=1), 1), served(FakeDecoder(2), 2)
    q_old, q_new = queue.SimpleQueue(), queue.SimpleQueue()
    a = e.submit_generation(params(n=3), old, q_old)
    e.step()
    b = e.submit_generation(params(n=2), new, q_new)  # submitted after the reload
    for _ in range(3):
        e.step()
    assert "".join(c.text for c in events(q_old) if isinstance(c, Chunk)) == "aaa"
    assert "".join(c.text for c in events(q_new) if isinstance(c, Chunk)) == "bb"
    assert all(ids == [a.id] for ids in old.decoder.decoded)
    assert all(ids == [b.id] for ids in new.decoder.decoded)


def test_a_failing_row_ends_alone(clock: Clock) -> None:
    decoder = FakeDecoder()
    e, model = engine(clock), served(decoder)
    healthy, bad = queue.SimpleQueue(), queue.SimpleQueue()
    good = e.submit_generation(params(n=3), model, healthy)
    poisoned = e.submit_generation(params(n=3, sampling=SamplingParams(0.7)), model, bad)
    decoder.poisoned.add(poisoned.id)
    for _ in range(3):
        e.step()
    assert events(bad)[-1].reason == FinishReason.ERROR  # type: ignore[union-attr]
    assert events(healthy)[-1].reason == FinishReason.LENGTH  # type: ignore[union-attr]
    assert good.generated == 3
    assert e.metrics.finished.labels("error")._value.get() == 1


def test_a_broken_model_fails_only_its_own_rows(clock: Clock) -> None:
    e, broken, fine = engine(clock), served(FakeDecoder(broken=True), 1), served(FakeDecoder(), 2)
    q_broken, q_fine = queue.SimpleQueue(), queue.SimpleQueue()
    e.submit_generation(params(n=3), broken, q_broken)
    e.submit_generation(params(n=3), fine, q_fine)
    for _ in range(3):
        e.step()
    assert events(q_broken)[-1].reason == FinishReason.ERROR  # type: ignore[union-attr]
    assert events(q_fine)[-1].reason == FinishReason.LENGTH  # type: ignore[union-attr]


def test_long_prompts_and_scores_share_each_iteration_with_decoding(clock: Clock) -> None:
    decoder = FakeDecoder()
    e, model = engine(clock, budget=Budget(min_extra=4, idle=100)), served(decoder)
    streams = [e.submit_generation(params(n=10_000), model, queue.SimpleQueue()) for _ in range(3)]
    e.step()  # three one-character prompts: straight to decoding
    long_prompt = e.submit_generation(params(prompt=[1] * 30, n=2), model, queue.SimpleQueue())
    job = e.submit_score(ScoreParams([0] * 200, 1, 0), model)
    steps = 0
    while not job.result.done():
        e.step()
        steps += 1
        # Every stream decodes in every iteration; the others get what the budget leaves.
        assert set(decoder.decoded[-1]) >= {s.id for s in streams if not s.finished}
    assert job.result.result() == [-1.0] * 199
    assert max(decoder.scored) <= 4 and all(n <= 4 for _, n in decoder.prefilled)
    assert long_prompt.generated == 2 and steps >= 199 // 4


def test_scores_get_the_whole_budget_when_nothing_decodes(clock: Clock) -> None:
    decoder = FakeDecoder()
    e, model = engine(clock, budget=Budget(min_extra=4, idle=100)), served(decoder)
    job = e.submit_score(ScoreParams([0] * 250, 1, 0), model)
    for _ in range(3):
        e.step()
    assert decoder.scored == [100, 100, 49] and job.result.done()


def test_cancelled_score_is_dropped(clock: Clock) -> None:
    decoder = FakeDecoder()
    e, model = engine(clock, budget=Budget(min_extra=4, idle=10)), served(decoder)
    job = e.submit_score(ScoreParams([0] * 250, 1, 0), model)
    e.step()
    job.cancel()
    e.step()
    assert job.result.cancelled() and decoder.scored == [10] and e.load() == (0, 0)


def test_shutdown_ends_everything(clock: Clock) -> None:
    e, model = engine(clock, max_running=1), served(FakeDecoder())
    running, waiting = queue.SimpleQueue(), queue.SimpleQueue()
    e.submit_generation(params(n=10_000), model, running)
    e.step()
    e.submit_generation(params(n=5), model, waiting)
    job = e.submit_score(ScoreParams([0] * 10_000, 1, 0), model)
    loop = threading.Thread(target=e.run)
    e.request_stop()
    loop.start()
    loop.join(timeout=60)
    assert not loop.is_alive(), "the engine loop did not stop"
    for q in (running, waiting):
        assert events(q)[-1].reason == FinishReason.SHUTDOWN  # type: ignore[union-attr]
    with pytest.raises(EngineStoppedError):
        job.result.result()
    with pytest.raises(EngineStoppedError):
        e.submit_generation(params(), model, queue.SimpleQueue())


def test_a_failing_score_fails_alone(clock: Clock) -> None:
    e, broken, fine = engine(clock), served(FakeDecoder(broken=True), 1), served(FakeDecoder(), 2)
    q = queue.SimpleQueue()
    stream = e.submit_generation(params(n=5), fine, q)
    bad = e.submit_score(ScoreParams([0] * 20, 1, 0), broken)
    good = e.submit_score(ScoreParams([0] * 20, 1, 0), fine)
    for _ in range(5):
        e.step()
    with pytest.raises(RuntimeError, match="broken"):
        bad.result.result()
    assert good.result.result() == [-1.0] * 19
    assert events(q)[-1].reason == FinishReason.LENGTH and stream.generated == 5  # type: ignore[union-attr]


def positions(e: Engine, kind: str) -> float:
    return e.metrics.positions.labels(kind)._value.get()


def test_a_learned_position_row_crossing_the_block_is_counted_as_a_window(clock: Clock) -> None:
    """The schedule decides cached vs window rows, and the budget and metrics count what is
    computed: the step at which the text outgrows the block recomputes a whole window."""
    config = GPTConfig(vocab_size=len(VOCAB), block_size=4, n_embd=8, n_head=2, n_layer=2)
    torch.manual_seed(0)
    model = GPT(config).eval()
    e, q = engine(clock), queue.SimpleQueue()
    e.submit_generation(params(prompt=[1, 2, 3], n=4), served(Decoder(model, 2), model=model), q)
    e.step()  # the 3-character prompt: 3 prompt positions, then "d" -> 4 characters
    e.step()  # position 3 from the cache -> 5 characters: the text outgrew the block
    assert (positions(e, "prompt"), positions(e, "decode"), positions(e, "window")) == (3, 1, 0)
    e.step()  # so this step recomputes the last 4 characters from position 0
    e.step()
    assert (positions(e, "decode"), positions(e, "window")) == (1, 2 * config.block_size)
    text = "".join(c.text for c in events(q) if isinstance(c, Chunk))
    expected = reference_generate(model, [1, 2, 3], 4, SamplingParams(temperature=0))
    assert text == "".join(VOCAB[i] for i in expected)


def test_each_step_delivers_every_rows_events_in_one_call(clock: Clock) -> None:
    """One hand-over per engine step (the service makes it one event-loop wake-up), not one
    per character or per row."""
    deliveries: list[list[tuple[object, object]]] = []
    e = engine(clock, deliver=deliveries.append)
    model = served(FakeDecoder())
    rows = [e.submit_generation(params(n=2), model, queue.SimpleQueue()) for _ in range(3)]
    e.step()
    e.step()
    assert len(deliveries) == 2
    assert [g for g, _ in deliveries[0]] == rows  # one character each
    last = deliveries[1]  # the second character and the summary of every row
    assert [g for g, _ in last] == [g for g in rows for _ in range(2)]
    assert all(isinstance(ev, Finished) for _, ev in last[1::2])
