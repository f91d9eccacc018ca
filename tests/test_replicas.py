"""Several real ``chargpt serve`` replicas and one client over all of them: calls spread
by round_robin over the replicas that report SERVING (counted by each replica's own
/metrics), a replica that starts later gets calls once connections age out
(--max-connection-age), SIGTERM with --drain-delay loses no call, kill -9 fails only the
streams on that replica. One module-wide fleet: the tests run in order, from the gentlest
to the kill."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from chargpt.cli import main
from client.api import LanguageModelClient
from tests.conftest import REPO, without_settings
from tests.replicas import HOSTS, Fleet, fleet, streams
from tests.server_process import wait_until

# A generous --drain-delay and drain: long enough for health-checking clients to hear
# NOT_SERVING on a busy machine; the test waits for events, never for these.
ARGS = ("--drain-delay", "5", "--drain-seconds", "300", "--max-connection-age", "3",
        "--max-new-tokens", "100000")  # fmt: skip
THREE = HOSTS[:3]
STREAM_TIMEOUT = 300


@pytest.fixture(scope="module")
def replicas(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with fleet(
        trained_run / "model.safetensors", tmp_path_factory.mktemp("replicas"), *ARGS
    ) as running:
        running.start(*THREE)
        yield running


@pytest.fixture(scope="module")
def client(replicas: Fleet) -> Iterator[LanguageModelClient]:
    """One long-lived client of the name, as an application would hold."""
    with LanguageModelClient(replicas.dns_target, timeout=60) as connected:
        yield connected


def connected_to_all(client: LanguageModelClient, fleet: Fleet, hosts: list[str]) -> None:
    """Calls until every one of ``hosts`` has answered one (its subchannel is READY)."""
    before = {h: fleet.count(h, "GetModelInfo") for h in hosts}

    def all_answered() -> bool:
        client.model_info()
        return all(fleet.count(h, "GetModelInfo") > before[h] for h in hosts)

    wait_until(all_answered, timeout=120)


def spread(
    client: LanguageModelClient, fleet: Fleet, hosts: list[str], n: int = 30
) -> dict[str, float]:
    """Run ``n`` streams together; how many each replica served."""
    before = {h: fleet.count(h) for h in hosts}
    running = streams(client, n, 40)
    for stream in running:
        stream.join()
        assert stream.ok, stream.code
    return {h: fleet.count(h) - before[h] for h in hosts}


@pytest.mark.parametrize("how", ["dns", "list"])
def test_streams_spread_over_every_replica(
    replicas: Fleet, client: LanguageModelClient, how: str
) -> None:
    with replicas.explained(), contextlib.ExitStack() as stack:
        if how == "list":
            target = ",".join(f"{h}:{replicas.port}" for h in THREE)
            client = stack.enter_context(LanguageModelClient(target, timeout=60))
        connected_to_all(client, replicas, THREE)
        served = spread(client, replicas, THREE)
        assert sum(served.values()) == 30
        # round_robin: about 10 each (pick_first, the default, would give 30/0/0)
        assert min(served.values()) >= 5, served


def test_the_command_line_clients_take_a_list_and_a_name(replicas: Fleet) -> None:
    env = without_settings()
    listed = ",".join(f"{h}:{replicas.port}" for h in THREE)
    before = sum(replicas.count(h) for h in THREE)
    cases = [
        (["health", "--server", listed], f"{listed}: SERVING"),
        (["health", "--server", replicas.dns_target], f"{replicas.dns_target}: SERVING"),
        (["score", "ROMEO:", "--server", replicas.dns_target], "perplexity"),
        (["generate", "ROMEO:", "--server", listed, "--max-new-tokens", "20"], ""),
    ]
    for args, expected in cases:
        result = subprocess.run([sys.executable, "-m", "chargpt", *args, "--timeout", "60"],
                                capture_output=True, text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
        assert result.returncode == 0, (args, result.stderr, replicas.logs())
        assert expected in result.stdout, (args, result.stdout)
    assert len(result.stdout) == 20  # exactly the generated characters
    assert sum(replicas.count(h) for h in THREE) == before + 1


def test_a_replica_started_later_gets_calls_as_connections_age(
    replicas: Fleet, client: LanguageModelClient
) -> None:
    with replicas.explained():
        connected_to_all(client, replicas, THREE)
        lookups = replicas.dns.queries
        replicas.start(HOSTS[3])  # now in the DNS answer; the client is not told
        failures = []

        def fourth_served() -> bool:
            try:
                client.score("ROMEO:")
            except grpc.RpcError as exc:
                failures.append(exc.code())
            return replicas.count(HOSTS[3], "Score") > 0

        wait_until(fourth_served, timeout=120)
        assert failures == []
        assert replicas.dns.queries > lookups  # the client looked the name up again


def calls_until(
    client: LanguageModelClient, condition, at_least_after: int = 0
) -> list[grpc.StatusCode]:  # type: ignore[no-untyped-def]
    """New calls, one after another, until ``condition()``, then ``at_least_after`` more;
    the codes of those that failed."""
    failed = []

    def call() -> None:
        try:
            client.score("ROMEO: ")
        except grpc.RpcError as exc:
            failed.append(exc.code())

    def called_and(condition_met) -> bool:  # type: ignore[no-untyped-def]
        call()
        return condition_met()

    wait_until(lambda: called_and(condition), timeout=180)
    for _ in range(at_least_after):
        call()
    return failed


def test_sigterm_with_drain_delay_fails_no_call(
    replicas: Fleet, client: LanguageModelClient
) -> None:
    victim = replicas.replicas[HOSTS[1]]
    with replicas.explained():
        connected_to_all(client, replicas, list(replicas.replicas))
        # A stream of its own keeps the victim draining until this test lets it go.
        with victim.connect(timeout=STREAM_TIMEOUT) as pinned_client:
            (pinned,) = streams(pinned_client, 1, 100000, seed=99)
            running = streams(client, 30, 600)
            victim.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: "still taking new calls" in victim.log, timeout=60)
            # NOT_SERVING, then (--drain-delay later) refusing new calls: every new call
            # finds another replica, before and after.
            failed = calls_until(client, lambda: "draining:" in victim.log, at_least_after=30)
            assert failed == []
            for stream in running:
                stream.join()
                assert stream.ok, stream.code  # in flight through the drain: finished
            assert victim.proc.poll() is None  # still draining: the pinned stream runs
            pinned.cancel()
            pinned.join()
        assert victim.proc.wait(120) == 0
        assert calls_until(client, lambda: True, at_least_after=20) == []


def test_kill_9_fails_only_the_streams_on_that_replica(
    replicas: Fleet, client: LanguageModelClient
) -> None:
    victim_host = HOSTS[2]
    victim = replicas.replicas[victim_host]
    alive = [h for h, s in replicas.replicas.items() if s.proc.poll() is None]
    with replicas.explained():
        connected_to_all(client, replicas, alive)
        running = streams(client, 30, 100000)  # they outlast the test: it cancels them
        on_victim = victim.metric("chargpt_running_requests")
        assert on_victim >= 1
        # The batch-slot gauge (vLLM's kv_cache_usage_perc): running / --max-running (64).
        assert victim.metric("chargpt_batch_slot_utilization") == on_victim / 64
        victim.proc.kill()
        victim.proc.wait(60)
        wait_until(lambda: sum(s.done for s in running) >= on_victim, timeout=120)
        failed = [s for s in running if s.done]
        assert len(failed) == on_victim
        assert {s.code for s in failed} == {grpc.StatusCode.UNAVAILABLE}  # not a hang
        assert calls_until(client, lambda: True, at_least_after=30) == []
        for stream in running:
            if not stream.done:
                stream.cancel()
        for stream in running:
            stream.join()
        assert {s.code for s in running if s not in failed} == {grpc.StatusCode.CANCELLED}


def test_a_malformed_server_list_is_one_error_naming_the_entry() -> None:
    cases = [
        (["health", "--server", "127.0.0.1:5000,bogus:2"], "'bogus:2': not an IP address"),
        (["score", "x", "--server", "127.0.0.1:5000,,127.0.0.1:5001"], "an empty entry"),
        (["generate", "--server", "127.0.0.1:5000,127.0.0.1:99999"], "'127.0.0.1:99999': no port"),
        (["health", "--server", "dns:///"], "dns:///NAME:PORT"),
    ]
    env = without_settings()
    for args, expected in cases:
        result = subprocess.run([sys.executable, "-m", "chargpt", *args], capture_output=True,
                                text=True, env=env, cwd=REPO, timeout=120)  # fmt: skip
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, (args, result.stderr)
        assert lines[0].startswith("Error: ") and expected in lines[0], (args, lines)


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--drain-delay", "-1"), ("--drain-delay", "nan"), ("--max-connection-age", "inf"),
     ("--max-connection-age", "-0.5"), ("--max-connection-age-grace", "1e309")],
)  # fmt: skip
def test_negative_or_non_finite_drain_settings_are_one_error(
    flag: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--checkpoint", "never-read.safetensors", flag, value])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exited.value.code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"Error: Invalid value for '{flag}'"), lines
