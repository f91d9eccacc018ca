"""The real ``chargpt serve`` process, driven by a real gRPC client."""

from __future__ import annotations

import contextlib
import math
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from chargpt.checkpoint import load_checkpoint
from chargpt.model import reference_generate
from chargpt.sampling import SamplingParams
from chargpt.v1 import language_model_pb2 as pb
from chargpt.v1 import language_model_pb2_grpc as pb_grpc
from tests.conftest import run_chargpt
from tests.server_process import ServerProcess, crowd, ended_by_deadline, free_port, wait_until


@pytest.fixture(scope="module")
def checkpoint(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "model.safetensors"
    shutil.copy(trained_run / "model.safetensors", path)
    return path


@pytest.fixture(scope="module")
def server(checkpoint: Path) -> Iterator[ServerProcess]:
    with ServerProcess(checkpoint, "--max-new-tokens", "100000") as running:
        yield running


@pytest.fixture(scope="module")
def reference(checkpoint: Path):  # type: ignore[no-untyped-def]
    return load_checkpoint(checkpoint)


def reference_text(reference, prompt: str, n: int, params: SamplingParams, seed: int = 0) -> str:  # type: ignore[no-untyped-def]
    ids = reference.tokenizer.encode(prompt) if prompt else [0]
    return reference.tokenizer.decode(reference_generate(reference.model, ids, n, params, seed))


def test_generate_streams_one_character_per_message_then_a_summary(server: ServerProcess) -> None:
    responses = list(server.client.generate("ROMEO:", max_new_tokens=20, temperature=0.8, seed=11))
    streamed, last = responses[:-1], responses[-1]
    # One character per message, several when the stream fell behind this tiny, fast model
    # (tests/test_relay.py pins that rule down exactly).
    assert len(streamed) >= 2 and all(r.text and not r.HasField("summary") for r in streamed)
    assert sum(len(r.text) for r in streamed) == 20 and last.text == ""
    # Per-character entries only "when the request asked for logprobs" (the proto).
    assert not any(r.tokens for r in responses)
    summary = last.summary
    assert summary.finish_reason == pb.FINISH_REASON_LENGTH
    assert summary.usage.prompt_characters == 6
    assert summary.usage.generated_characters == 20
    assert summary.seed == 11
    t = summary.timings
    assert 0 <= t.queue_seconds <= t.time_to_first_token_seconds <= t.total_seconds
    info = server.client.model_info()
    assert summary.model.step == info.step and summary.model.weights_sha256 == info.weights_sha256


def test_unset_seed_is_chosen_and_echoed(server: ServerProcess) -> None:
    text, summary = server.client.generate_text("ROMEO:", max_new_tokens=30)
    again, _ = server.client.generate_text("ROMEO:", max_new_tokens=30, seed=summary.seed)
    assert again == text


def test_coalesced_messages(server: ServerProcess) -> None:
    responses = list(server.client.generate("", max_new_tokens=25, characters_per_message=10))
    sizes = [len(r.text) for r in responses]
    assert sum(sizes) == 25 and all(size >= 10 for size in sizes[:-1])
    assert len(sizes) >= 2  # 25 characters never fit one message of "at least 10"
    assert responses[-1].summary.usage.prompt_characters == 1  # the empty-prompt start token


def test_a_slow_reader_gets_the_same_text_coalesced_within_its_ceiling(
    server: ServerProcess,
) -> None:
    """A client that stops reading (a 1 KiB receive window, no window growth) stalls the
    server's writes: the characters generated meanwhile pile up and come out coalesced,
    in order, none lost, never more than the ceiling per message, and the same text as a
    fast reader's for the same seed, which ran while another stream shared the batch."""
    n, ceiling = 4000, 16
    request = {"max_new_tokens": n, "temperature": 0.9, "seed": 41}
    alone = "".join(r.text for r in server.client.generate("ROMEO:", **request))
    channel = grpc.insecure_channel(
        server.target, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    )
    finished = server.metric("chargpt_finished_generations_total", reason="length")
    with channel, crowd(server, 1):
        stub = pb_grpc.LanguageModelStub(channel)
        stream = stub.Generate(
            pb.GenerateRequest(prompt="ROMEO:", max_characters_per_message=ceiling, **request),
            timeout=120,
        )
        messages = [next(stream)]
        # The engine finishes the generation while this client reads nothing more.
        wait_until(
            lambda: server.metric("chargpt_finished_generations_total", reason="length") > finished,
            timeout=120,
        )
        messages += list(stream)
    assert "".join(m.text for m in messages) == alone
    assert max(len(m.text) for m in messages) <= ceiling
    assert len(messages) < n // 2  # the backlog was coalesced
    assert messages[-1].summary.usage.generated_characters == n


def test_stream_interval_is_the_default_floor(checkpoint: Path) -> None:
    with ServerProcess(checkpoint, "--stream-interval", "8") as coalescing:
        responses = list(coalescing.client.generate("", max_new_tokens=30, seed=5))
        sizes = [len(r.text) for r in responses]
        assert sum(sizes) == 30 and all(size >= 8 for size in sizes[:-1])
        # A request's own setting wins.
        own = list(coalescing.client.generate("", max_new_tokens=5, characters_per_message=1))
        assert sum(len(r.text) for r in own) == 5 and len(own) >= 2


def test_greedy_equals_the_reference_far_past_block_size(server: ServerProcess, reference) -> None:  # type: ignore[no-untyped-def]
    block_size = reference.info.config.block_size
    n = 12 * block_size
    for prompt in ("ROMEO:", "", "JULIET:\nThe quick brown fox jumps over"):
        text, _ = server.client.generate_text(prompt, max_new_tokens=n, temperature=0)
        assert text == reference_text(reference, prompt, n, SamplingParams(temperature=0))


def test_seeded_sampling_equals_the_reference_and_the_offline_sampler(
    server: ServerProcess, reference, checkpoint: Path
) -> None:  # type: ignore[no-untyped-def]
    params = {"temperature": 0.9, "top_k": 10, "top_p": 0.95}
    text, _ = server.client.generate_text("NURSE:", max_new_tokens=100, seed=42, **params)
    assert text == reference_text(reference, "NURSE:", 100, SamplingParams(0.9, 10, 0.95), seed=42)
    offline = run_chargpt(
        "sample", "--checkpoint", str(checkpoint), "--prompt", "NURSE:", "--max-new-tokens", "100",
        "--temperature", "0.9", "--top-k", "10", "--top-p", "0.95", "--seed", "42",
    )  # fmt: skip
    assert offline.stdout == text
    online = run_chargpt(
        "generate", "NURSE:", "--server", server.target, "--max-new-tokens", "100",
        "--temperature", "0.9", "--top-k", "10", "--top-p", "0.95", "--seed", "42",
    )  # fmt: skip
    assert online.returncode == 0, online.stderr
    assert online.stdout == text


def reference_logprobs(reference, context: str, text: str) -> list[float]:  # type: ignore[no-untyped-def]
    tok, model = reference.tokenizer, reference.model
    ids = (tok.encode(context) if context else [0]) + tok.encode(text)
    first = len(ids) - len(text)
    out = []
    with torch.no_grad():
        for i in range(first, len(ids)):
            window = ids[max(0, i - model.config.block_size) : i]
            logits, _ = model(torch.tensor([window]))
            out.append(float(torch.log_softmax(logits[0, -1], dim=-1)[ids[i]]))
    return out


def test_score_equals_the_reference_log_softmax(server: ServerProcess, reference) -> None:  # type: ignore[no-untyped-def]
    text = "ROMEO:\nThe lazy dog sleeps under her balcony at night and then sings.\n" * 2
    for context in ("", "JULIET:\n"):
        result = server.client.score(text, context=context)
        expected = reference_logprobs(reference, context, text)
        assert result.scored_characters == len(text)
        assert result.context_characters == len(context)
        assert list(result.logprobs) == pytest.approx(expected, abs=1e-4)
        total = sum(expected)
        assert result.total_logprob == pytest.approx(total, abs=1e-3)
        assert result.mean_nll == pytest.approx(-total / len(text), abs=1e-5)
        assert result.bits_per_character == pytest.approx(result.mean_nll / math.log(2))
        assert result.perplexity == pytest.approx(math.exp(result.mean_nll))


def test_same_seed_same_text_alone_or_among_fifty(server: ServerProcess) -> None:
    request = {"max_new_tokens": 60, "temperature": 1.0, "top_k": 20, "seed": 1234}
    alone, _ = server.client.generate_text("ROMEO:", **request)
    steps_before = server.metric("chargpt_batch_size_count")
    small_before = server.metric("chargpt_batch_size_bucket", le="8.0")
    with crowd(server, 50):  # every step of the crowded request decodes 51 rows
        crowded, _ = server.client.generate_text("ROMEO:", **request)
        assert crowded == alone
    assert (
        server.metric("chargpt_batch_size_count") - steps_before
        > server.metric("chargpt_batch_size_bucket", le="8.0") - small_before
    )  # the steps really did batch more than 8 generations


def test_cancelled_stream_leaves_the_batch(server: ServerProcess) -> None:
    wait_until(lambda: server.metric("chargpt_running_requests") == 0)
    stream = server.client.generate("ROMEO:", max_new_tokens=100_000)
    next(stream)
    assert server.metric("chargpt_running_requests") == 1
    cancelled_before = server.metric("chargpt_finished_generations_total", reason="cancelled")
    stream.cancel()
    wait_until(lambda: server.metric("chargpt_running_requests") == 0)
    wait_until(
        lambda: (
            server.metric("chargpt_finished_generations_total", reason="cancelled")
            == cancelled_before + 1
        )
    )


def test_deadline_ends_with_time_limit(server: ServerProcess) -> None:
    # A smoke test over the socket: the server ends the generation for its deadline (the
    # margin that gets the summary out in time is pinned in process, tests/test_engine.py).
    before = server.metric("chargpt_finished_generations_total", reason="time_limit")
    responses = ended_by_deadline(
        server.client.generate("ROMEO:", max_new_tokens=100_000, timeout=3)
    )
    wait_until(
        lambda: (
            server.metric("chargpt_finished_generations_total", reason="time_limit") == before + 1
        )
    )
    if responses:  # the summary arrived (it does unless the machine stalled the server)
        summary = responses[-1].summary
        assert summary.finish_reason == pb.FINISH_REASON_TIME_LIMIT
        text = "".join(r.text for r in responses)
        assert 0 < len(text) == summary.usage.generated_characters < 100_000


def invalid(call) -> grpc.RpcError:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, pb.ScoreResponse):
            list(result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    metadata = dict(err.value.trailing_metadata())
    assert metadata["chargpt-reason"] == "invalid"
    assert err.value.details().startswith(metadata["chargpt-field"] + ":")
    return err.value


def test_bad_requests_name_the_field_and_the_server_keeps_serving(server: ServerProcess) -> None:
    c = server.client
    vocab = c.model_info().vocabulary
    assert "~" not in vocab and "@" not in vocab
    cases = [
        (lambda: c.generate("ab~c@~"), "prompt: characters not in the vocabulary: '~' at positions 2, 5; '@' at position 4"),
        (lambda: c.generate("x" * 5000), "prompt: 5000 characters exceeds"),
        (lambda: c.generate("a", max_new_tokens=1_000_000), "max_new_tokens: 1000000 exceeds the server limit of 100000"),
        (lambda: c.generate("a", temperature=-0.5), "temperature"),
        (lambda: c.generate("a", temperature=math.nan), "temperature"),
        (lambda: c.generate("a", top_p=0.0), "top_p"),
        (lambda: c.generate("a", top_p=1.5), "top_p"),
        (lambda: c.generate("a", top_k=len(vocab) + 1), "top_k"),
        (lambda: c.generate("a", stop=["x"] * 9), "stop: 9 sequences"),
        (lambda: c.generate("a", stop=["ok", ""]), "stop[1]: empty"),
        (lambda: c.generate("a", stop=["y" * 65]), "stop[0]"),
        (lambda: c.generate("a", logprobs=True, top_logprobs=21), "top_logprobs"),
        (lambda: c.generate("a", top_logprobs=2), "top_logprobs: requires logprobs"),
        (lambda: c.generate("a", characters_per_message=5000), "characters_per_message"),
        (lambda: c.score(""), "text: must not be empty"),
        (lambda: c.score("abc", context="~"), "context: characters not in the vocabulary: '~' at position 0"),
        (lambda: c.score("a~"), "text: characters not in the vocabulary: '~' at position 1"),
    ]  # fmt: skip
    for call, message in cases:
        assert message in invalid(call).details()
    assert server.proc.poll() is None
    text, summary = c.generate_text("ROMEO:", max_new_tokens=10)
    assert len(text) == 10 and summary.finish_reason == pb.FINISH_REASON_LENGTH
    assert server.metric("chargpt_requests_total", method="Generate", code="INVALID_ARGUMENT") >= 14


def test_stop_sequences_are_held_back_and_not_streamed(server: ServerProcess, reference) -> None:  # type: ignore[no-untyped-def]
    full = reference_text(reference, "ROMEO:", 200, SamplingParams(temperature=0))
    stop = full[50:53]
    cut = full.index(stop)
    responses = list(
        server.client.generate("ROMEO:", max_new_tokens=200, temperature=0, stop=[stop, "@@"])
    )
    text = "".join(r.text for r in responses)
    summary = responses[-1].summary
    assert text == full[:cut]
    assert summary.finish_reason == pb.FINISH_REASON_STOP
    assert summary.stop_sequence == stop
    assert summary.usage.generated_characters == cut + len(stop)


def test_logprobs_with_alternatives(server: ServerProcess, reference) -> None:  # type: ignore[no-untyped-def]
    responses = list(
        server.client.generate(
            "ROMEO:", max_new_tokens=5, temperature=0, logprobs=True, top_logprobs=3
        )
    )
    tokens = [t for r in responses for t in r.tokens]
    assert len(tokens) == 5
    expected = reference_logprobs(reference, "ROMEO:", "".join(t.token.text for t in tokens))
    for token, logprob in zip(tokens, expected, strict=True):
        assert token.token.logprob == pytest.approx(logprob, abs=1e-4)
        assert len(token.top) == 3
        assert token.top[0].id == token.token.id  # greedy picks the most likely
        assert token.top[0].logprob >= token.top[1].logprob >= token.top[2].logprob


def test_model_info(server: ServerProcess, reference, checkpoint: Path) -> None:  # type: ignore[no-untyped-def]
    info = server.client.model_info()
    assert info.vocabulary == "".join(reference.info.vocab)
    assert info.block_size == reference.info.config.block_size
    assert (info.n_layer, info.n_head, info.n_embd) == (2, 2, 32)
    assert info.parameters == reference.model.num_parameters()
    assert info.step == reference.info.step
    assert info.val_loss == pytest.approx(reference.info.val_loss)
    assert info.weights_sha256 == reference.file_sha256
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert info.checkpoint_path == str(checkpoint)
    assert abs(info.loaded_at_unix - time.time()) < 3600


def test_reflection_lists_the_services(server: ServerProcess) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.client.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"chargpt.v1.LanguageModel", "grpc.health.v1.Health"} <= names


def test_metrics_count_what_was_sent(server: ServerProcess) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    before = {
        "generated": server.metric("chargpt_generated_characters_total"),
        "prompt": server.metric("chargpt_prompt_characters_total"),
        "scored": server.metric("chargpt_scored_characters_total"),
        "ok": server.metric("chargpt_requests_total", method="Generate", code="OK"),
        "score_ok": server.metric("chargpt_requests_total", method="Score", code="OK"),
        "ttft": server.metric("chargpt_time_to_first_token_seconds_count"),
        "length": server.metric("chargpt_finished_generations_total", reason="length"),
    }
    for n in (7, 11, 13):
        server.client.generate_text("ROMEO:", max_new_tokens=n)
    server.client.score("hello there", context="ROMEO:")
    families = {f.name: f for f in text_string_to_metric_families(server.metrics_text())}
    for name in (
        "chargpt_requests", "chargpt_request_duration_seconds", "chargpt_time_to_first_token_seconds",
        "chargpt_inter_token_latency_seconds", "chargpt_queue_time_seconds", "chargpt_batch_size",
        "chargpt_generated_characters", "chargpt_prompt_characters", "chargpt_scored_characters",
        "chargpt_running_requests", "chargpt_waiting_requests", "chargpt_finished_generations",
        "chargpt_model_info", "chargpt_model_reloads", "chargpt_decode_step_seconds",
    ):  # fmt: skip
        assert name in families, name
    assert server.metric("chargpt_generated_characters_total") == before["generated"] + 31
    assert server.metric("chargpt_prompt_characters_total") == before["prompt"] + 18
    assert server.metric("chargpt_scored_characters_total") == before["scored"] + 11
    wait_until(
        lambda: (
            server.metric("chargpt_requests_total", method="Generate", code="OK")
            == before["ok"] + 3
        )
    )
    assert (
        server.metric("chargpt_requests_total", method="Score", code="OK") == before["score_ok"] + 1
    )
    assert server.metric("chargpt_time_to_first_token_seconds_count") == before["ttft"] + 3
    assert (
        server.metric("chargpt_finished_generations_total", reason="length") == before["length"] + 3
    )
    info = server.client.model_info()
    assert server.metric("chargpt_model_info", sha256=info.weights_sha256, step=str(info.step)) == 1


def drain(stream) -> None:  # type: ignore[no-untyped-def]
    """Read a stream to its end (or its cancellation)."""
    with contextlib.suppress(grpc.RpcError):
        for _ in stream:
            pass


def test_overload_is_refused_at_once(checkpoint: Path) -> None:
    limits = ("--max-running", "1", "--max-waiting", "1", "--max-new-tokens", "100000")
    with ServerProcess(checkpoint, *limits) as server:
        # Two long streams, each read by a thread of its own (a stream nobody reads backs
        # up the HTTP/2 connection it shares, which once held back the other call).
        # One at a time: the second, sent before the engine admits the first, would find
        # the one waiting place taken.
        streams = []
        for gauge in ("chargpt_running_requests", "chargpt_waiting_requests"):
            streams.append(server.client.generate("ROMEO:", max_new_tokens=100_000))
            threading.Thread(target=drain, args=(streams[-1],), daemon=True).start()
            wait_until(lambda gauge=gauge: server.metric(gauge) == 1, timeout=60)
        assert server.metric("chargpt_running_requests") == 1
        with pytest.raises(grpc.RpcError) as err:
            list(server.client.generate("ROMEO:", max_new_tokens=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "capacity" in err.value.details()
        # Refused at once: not after waiting for a place (both still hold theirs).
        assert server.metric("chargpt_running_requests") == 1
        assert server.metric("chargpt_waiting_requests") == 1
        for stream in streams:
            stream.cancel()
        wait_until(lambda: server.metric("chargpt_running_requests") == 0)
        assert server.client.generate_text("ROMEO:", max_new_tokens=5)[0]


def test_client_cli_messages(server: ServerProcess, tmp_path: Path) -> None:
    ok = run_chargpt("health", "--server", server.target)
    assert ok.returncode == 0 and "SERVING" in ok.stdout
    scored = run_chargpt("score", "hello", "--server", server.target, "--per-char")
    assert scored.returncode == 0 and "bits/char" in scored.stdout and "'h'" in scored.stdout
    bad = run_chargpt("generate", "a~", "--server", server.target)
    assert bad.returncode == 2
    assert (
        bad.stderr.strip()
        == "Error: invalid request: prompt: characters not in the vocabulary: '~' at position 1"
    )
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    gone = run_chargpt("generate", "hi", "--server", dead, "--timeout", "3")
    assert gone.returncode == 1
    assert gone.stderr.startswith(f"Error: cannot reach a chargpt server at {dead}")
    down = run_chargpt("health", "--server", dead, "--timeout", "2")
    assert down.returncode == 1


def test_lifecycle_health_reload_and_drain(trained_run: Path, tmp_path: Path) -> None:
    """NOT_SERVING before the file exists; SERVING once published; hot reload under load
    with no failed stream; a corrupt publish refused; SIGTERM drains."""
    import dataclasses
    import signal

    from chargpt.checkpoint import atomic_write, save_checkpoint

    path = tmp_path / "model.safetensors"
    with ServerProcess(path, "--drain-seconds", "20", wait_serving=False) as server:
        with pytest.raises(grpc.RpcError) as err:
            server.client.generate_text("ROMEO:", max_new_tokens=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(err.value.trailing_metadata())["chargpt-reason"] == "no_model"
        assert server.client.health("chargpt.v1.LanguageModel") == "NOT_SERVING"
        no_model = run_chargpt("generate", "hi", "--server", server.target)
        assert "NOT_SERVING" in no_model.stderr

        loaded = load_checkpoint(trained_run / "model.safetensors")
        atomic_write(path, (trained_run / "model.safetensors").read_bytes())
        wait_until(lambda: server.client.health() == "SERVING")
        first_step = server.client.model_info().step

        # Streams running across a reload finish, on the weights they started with.
        results: list[tuple[str, pb.GenerateSummary] | BaseException] = []

        def stream() -> None:
            try:
                results.append(
                    server.client.generate_text("ROMEO:", max_new_tokens=300, temperature=0)
                )
            except BaseException as exc:
                results.append(exc)

        threads = [threading.Thread(target=stream) for _ in range(4)]
        for t in threads:
            t.start()
        wait_until(lambda: server.metric("chargpt_running_requests") >= 1)
        with torch.no_grad():
            for p in loaded.model.parameters():
                p.mul_(1.01)
        new_info = dataclasses.replace(loaded.info, step=first_step + 1000, created="")
        save_checkpoint(path, loaded.model, new_info)
        wait_until(lambda: server.client.model_info().step == first_step + 1000)
        for t in threads:
            t.join()
        assert len(results) == 4
        assert all(isinstance(r, tuple) for r in results), results
        assert {r[1].model.step for r in results} == {first_step}  # type: ignore[index]
        assert (
            server.client.generate_text("ROMEO:", max_new_tokens=5)[1].model.step
            == first_step + 1000
        )
        assert server.metric("chargpt_model_reloads_total", outcome="loaded") == 2

        # A corrupt publish is refused; the old model keeps serving.
        data = bytearray(path.read_bytes())
        data[-10] ^= 0xFF
        atomic_write(path, bytes(data))
        wait_until(lambda: server.metric("chargpt_model_reloads_total", outcome="refused") == 1)
        assert "refused checkpoint" in server.log and "digest" in server.log
        assert server.client.model_info().step == first_step + 1000
        assert server.client.health() == "SERVING"

        # SIGTERM: NOT_SERVING at once, new calls refused, the running stream finishes.
        long = server.client.generate("ROMEO:", max_new_tokens=400)
        next(long)
        server.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: server.client.health(timeout=1) == "NOT_SERVING")
        with pytest.raises(grpc.RpcError) as err:
            server.client.generate_text("ROMEO:", max_new_tokens=3)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(long)
        assert rest[-1].summary.finish_reason == pb.FINISH_REASON_LENGTH
        assert server.proc.wait(30) == 0
        assert "draining" in server.log
