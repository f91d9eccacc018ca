"""Hostile and unlucky requests against the real server process: each one gets the right
status, and none of them touches a neighbour's stream."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from chargpt.checkpoint import CheckpointInfo, LoadedModel, load_checkpoint, save_checkpoint
from chargpt.model import GPT, GPTConfig, reference_generate
from chargpt.sampling import SamplingParams
from chargpt.tokenizer import CharTokenizer
from chargpt.v1 import language_model_pb2 as pb
from tests.conftest import make_text
from tests.server_process import ServerProcess, ended_by_deadline, wait_until

# The bound on status messages (gRPC clients drop trailers over 8-16 KiB).
MESSAGE_BOUND = 1024


@pytest.fixture(scope="module")
def lecture_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The lecture's model shape (8 layers, 64 wide, block 32) with random weights: as
    costly per step as the real one, so scheduling matters as it does in production."""
    tokenizer = CharTokenizer.from_text(make_text())
    config = GPTConfig(vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    path = tmp_path_factory.mktemp("hostile") / "model.safetensors"
    save_checkpoint(path, model, CheckpointInfo(config, tokenizer.vocab, 1, None, None, "00" * 32, "hostile"))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def server(lecture_checkpoint: Path) -> Iterator[ServerProcess]:
    with ServerProcess(lecture_checkpoint, "--max-new-tokens", "100000") as running:
        yield running


@pytest.fixture(scope="module")
def reference(lecture_checkpoint: Path) -> LoadedModel:
    return load_checkpoint(lecture_checkpoint)


def greedy(reference: LoadedModel, prompt: str, n: int) -> str:
    ids = reference.tokenizer.encode(prompt)
    new = reference_generate(reference.model, ids, n, SamplingParams(temperature=0))
    return reference.tokenizer.decode(new)


class Background:
    """A greedy stream read to its end on a thread of its own, as a client would."""

    def __init__(self, server: ServerProcess, prompt: str, n: int) -> None:
        self.stream = server.client.generate(prompt, max_new_tokens=n, temperature=0)
        self.text: list[str] = []
        self.error: grpc.RpcError | None = None
        self.first = threading.Event()
        self.thread = threading.Thread(target=self._read)
        self.thread.start()

    def _read(self) -> None:
        try:
            for response in self.stream:
                self.text.append(response.text)
                self.first.set()
        except grpc.RpcError as exc:
            self.error = exc
        self.first.set()

    def result(self) -> str:
        self.thread.join()
        assert self.error is None, self.error
        return "".join(self.text)


def rpc_error(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, pb.ScoreResponse):
            list(result)
    return err.value


def test_a_tiny_temperature_is_greedy_and_leaves_its_neighbour_alone(
    server: ServerProcess, reference: LoadedModel
) -> None:
    neighbour = Background(server, "ROMEO:", 500)
    neighbour.first.wait()
    for temperature in (1e-38, 1e-45):
        text, summary = server.client.generate_text(
            "ROMEO:", max_new_tokens=5, temperature=temperature
        )
        assert summary.finish_reason == pb.FINISH_REASON_LENGTH
        assert text == greedy(reference, "ROMEO:", 5)  # greedy in the limit
    assert neighbour.result() == greedy(reference, "ROMEO:", 500)


def foreign(n: int) -> str:
    return "".join(chr(0x4E00 + i) for i in range(n))  # n distinct CJK ideographs


@pytest.mark.parametrize("field", ["prompt", "stop", "text", "context"])
def test_errors_about_thousands_of_distinct_characters_stay_small(
    server: ServerProcess, field: str
) -> None:
    c = server.client
    calls = {
        "prompt": lambda: c.generate(foreign(4000), max_new_tokens=1),
        "stop": lambda: c.generate("ROMEO:", max_new_tokens=1, stop=[foreign(4000)]),
        "text": lambda: c.score(foreign(4000)),
        "context": lambda: c.score("ROMEO:", context=foreign(4000)),
    }
    err = rpc_error(calls[field])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().startswith(f"{field}") and len(err.details()) <= MESSAGE_BOUND
    assert c.health() == "SERVING"


@pytest.mark.parametrize("field", ["prompt", "stop", "text", "context"])
def test_a_ten_megabyte_field_is_invalid_not_resource_exhausted(
    server: ServerProcess, field: str
) -> None:
    huge = "a" * 10_000_000
    c = server.client
    calls = {
        "prompt": lambda: c.generate(huge, max_new_tokens=1),
        "stop": lambda: c.generate("ROMEO:", max_new_tokens=1, stop=[huge]),
        "text": lambda: c.score(huge),
        "context": lambda: c.score("ROMEO:", context=huge),
    }
    err = rpc_error(calls[field])
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
    assert err.details().split(":")[0] in (field, "stop[0]", "text")  # names the field


MALFORMED = {
    "invalid UTF-8 in a string": b"\x0a\x02\xff\xfe",
    "truncated": b"\x0a\x10ROMEO",
    "garbage": b"\xff\xff\xff\xff\xff\xff",
}


@pytest.mark.parametrize("payload", MALFORMED.values(), ids=MALFORMED.keys())
def test_bytes_that_are_no_message_get_invalid_argument_and_a_count(
    server: ServerProcess, payload: bytes
) -> None:
    channel = server.client.channel
    before = server.metric("chargpt_requests_total", method="Generate", code="INVALID_ARGUMENT")
    calls = {
        "Generate": (channel.unary_stream("/chargpt.v1.LanguageModel/Generate"), "GenerateRequest"),
        "Score": (channel.unary_unary("/chargpt.v1.LanguageModel/Score"), "ScoreRequest"),
    }  # fmt: skip
    for method, (call, message) in calls.items():
        err = rpc_error(lambda call=call: call(payload, timeout=120))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, err.details())
        assert err.details().startswith(f"request is not a valid chargpt.v1.{message}")
    wait_until(
        lambda: (
            server.metric("chargpt_requests_total", method="Generate", code="INVALID_ARGUMENT")
            == before + 1
        )
    )
    assert "Traceback" not in server.log and "DecodeError" not in server.log


def test_deadlines_end_with_a_final_message_while_scores_run(server: ServerProcess) -> None:
    """Generations with a deadline are ended by the server for it (FINISH_REASON_TIME_LIMIT,
    with their summary) while another client scores long texts in a loop. That the summary
    beats the deadline however slow the iterations is pinned in process
    (tests/test_engine.py: the margin grows with the slowest iteration)."""
    before = server.metric("chargpt_finished_generations_total", reason="time_limit")
    stop, scoring = threading.Event(), threading.Event()
    text = (make_text(3000, seed=3))[:3000]
    errors: list[grpc.RpcError] = []

    def score_loop() -> None:
        try:
            while not stop.is_set():
                server.client.score(text, timeout=600)  # slow on a busy machine, never wrong
                scoring.set()
        except grpc.RpcError as exc:
            errors.append(exc)
        finally:
            scoring.set()

    scorer = threading.Thread(target=score_loop)
    scorer.start()
    try:
        scoring.wait()
        assert not errors, errors

        def timed_out(i: int) -> list[pb.GenerateResponse]:
            stream = server.client.generate(
                "ROMEO:", max_new_tokens=100_000, temperature=0, timeout=3
            )
            return ended_by_deadline(stream)

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(timed_out, range(6)))
        wait_until(
            lambda: (
                server.metric("chargpt_finished_generations_total", reason="time_limit")
                == before + 6
            )
        )
    finally:
        stop.set()
        scorer.join()
    assert not errors, errors
    for responses in filter(None, answers):  # those whose summary arrived (see ended_by_deadline)
        summary = responses[-1].summary
        assert summary.finish_reason == pb.FINISH_REASON_TIME_LIMIT
        assert summary.usage.generated_characters == sum(len(r.text) for r in responses) > 0


def positions(server: ServerProcess) -> dict[str, float]:
    """chargpt_computed_positions_total by work, from one scrape."""
    families = text_string_to_metric_families(server.metrics_text())
    return {
        sample.labels["work"]: sample.value
        for family in families
        for sample in family.samples
        if sample.name == "chargpt_computed_positions_total"
    }


def test_a_long_score_shares_each_iteration_with_a_stream(
    server: ServerProcess, reference: LoadedModel
) -> None:
    """While a stream runs beside a 16,384-character Score, the Score computes no more
    positions per iteration than the stream's decoding does (a whole window per character,
    once the text is longer than the block): the engine's budget, seen from outside
    through the positions counters, however fast the machine is. Both snapshots are taken
    while the stream is running, so every iteration between them decoded it (the counters
    may be read mid-iteration: one iteration of slack at each end)."""
    block = reference.info.config.block_size
    text = (make_text(17_000, seed=5))[:16_384]
    stream = server.client.generate("ROMEO:", max_new_tokens=100_000, temperature=0, timeout=600)
    received = [next(stream).text]
    while len("".join(received)) < 2 * block:  # past the block: a window per character
        received.append(next(stream).text)
    score = server.client.stub.Score.future(pb.ScoreRequest(text=text), timeout=600)
    wait_until(lambda: positions(server)["score"] > 0)
    before = positions(server)
    received += [next(stream).text for _ in range(200)]
    after = positions(server)
    stream.cancel()
    score.cancel()  # its completion is the engine tests' business; this one is about sharing
    decoded = sum(after[w] - before[w] for w in ("decode", "window"))
    scored = after["score"] - before["score"]
    assert 0 < scored <= decoded + 2 * block, (scored, decoded)
    text = "".join(received)
    assert text == greedy(reference, "ROMEO:", len(text))


# ---- random, partly hostile requests ----------------------------------------------------

TEXT = st.text(alphabet=st.sampled_from(sorted(set(make_text()) | {"~", "é", "\x00", "一"})),
               max_size=40)  # fmt: skip
GENERATE = st.builds(
    pb.GenerateRequest,
    prompt=TEXT,
    max_new_tokens=st.one_of(st.integers(0, 20), st.sampled_from([2**32 - 1, 100_001])),
    temperature=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    top_k=st.one_of(st.integers(0, 70), st.just(2**32 - 1)),
    top_p=st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=32)),
    seed=st.one_of(st.none(), st.integers(0, 2**64 - 1)),
    stop=st.lists(TEXT, max_size=10),
    logprobs=st.booleans(),
    top_logprobs=st.one_of(st.integers(0, 25), st.just(2**32 - 1)),
    characters_per_message=st.one_of(st.integers(0, 30), st.just(2**32 - 1)),
)
SCORE = st.builds(pb.ScoreRequest, text=TEXT, context=TEXT)
FIELDS = {f.name for m in (pb.GenerateRequest, pb.ScoreRequest) for f in m.DESCRIPTOR.fields}


def answered_ok_or_named(call) -> None:  # type: ignore[no-untyped-def]
    try:
        result = call()
        if not isinstance(result, pb.ScoreResponse):
            responses = list(result)
            assert responses[-1].HasField("summary")
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT, (exc.code(), exc.details())
        named = exc.details().split(":")[0].split("[")[0]
        assert named in FIELDS, exc.details()
        assert len(exc.details()) <= MESSAGE_BOUND


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
@given(request=st.one_of(GENERATE, SCORE))
def test_random_requests_are_answered_or_refused_by_field(
    server: ServerProcess, request: pb.GenerateRequest | pb.ScoreRequest
) -> None:
    stub = server.client.stub
    if isinstance(request, pb.GenerateRequest):
        answered_ok_or_named(lambda: stub.Generate(request, timeout=60))
    else:
        answered_ok_or_named(lambda: stub.Score(request, timeout=60))


def test_after_the_random_requests_the_server_serves_as_before(
    server: ServerProcess, reference: LoadedModel
) -> None:
    assert server.client.health() == "SERVING" and server.proc.poll() is None
    text, _ = server.client.generate_text("JULIET:", max_new_tokens=100, temperature=0)
    assert text == greedy(reference, "JULIET:", 100)
    assert "Traceback" not in server.log
