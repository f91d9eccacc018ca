"""Starting the real ``chargpt serve`` process for integration tests."""

from __future__ import annotations

import contextlib
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from client.api import ClientTLS, LanguageModelClient
from tests.conftest import REPO, without_settings

SAME: Any = object()  # ServerProcess.connect(): the server's own setting


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_free_on(hosts: list[str]) -> int:
    """A port that no socket uses on any of ``hosts`` (loopback addresses: replicas that
    one DNS name resolves to share a port, as pods behind a headless Service do). It is
    below the kernel's ephemeral range, so no outgoing connection on this busy machine
    takes it between this check and the replicas binding it, as one may a port that
    ``free_port`` returns (the replicas start some seconds later)."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    while True:
        port = random.randrange(10000, max(10001, ephemeral))
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port


def wait_until(predicate, timeout: float = 60.0, interval: float = 0.05) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            if predicate():
                return
        except Exception as exc:  # keep polling until the deadline
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s (last error: {last_error!r})")
        time.sleep(interval)


class ServerProcess:
    """``with ServerProcess(checkpoint, "--max-running", "4") as server: server.client...``

    ``env`` adds ``CHARGPT_*`` settings to the server's environment; ``tls`` and ``token``
    are what ``server.client`` (and ``connect()``) use to reach it.
    """

    def __init__(
        self,
        checkpoint: Path,
        *args: str,
        wait_serving: bool = True,
        env: dict[str, str] | None = None,
        tls: ClientTLS | None = None,
        token: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
    ) -> None:
        self.checkpoint = checkpoint
        self.host = host
        self.port = port or free_port()
        self.metrics_port = free_port()
        self.args = args
        self.wait_serving = wait_serving
        self.extra_env = env or {}
        self.tls = tls
        self.token = token
        self.target = f"{host}:{self.port}"
        self.log_path = checkpoint.parent / f"server-{host}-{self.port}.log"

    def connect(
        self, timeout: float = 60, tls: ClientTLS | None = SAME, token: str | None = SAME
    ) -> LanguageModelClient:
        """A new client of this server, with its ``tls`` and ``token`` unless given."""
        return LanguageModelClient(
            self.target, timeout,
            tls=self.tls if tls is SAME else tls, token=self.token if token is SAME else token,
        )  # fmt: skip

    def __enter__(self) -> ServerProcess:
        env = without_settings()
        env.update(self.extra_env)
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "chargpt", "serve", "--checkpoint", str(self.checkpoint),
                "--host", self.host, "--port", str(self.port),
                "--metrics-port", str(self.metrics_port), "--reload-seconds", "0.2",
                # Eager unless a test asks for --compile: compiling takes a minute or more.
                "--no-compile", *self.args,
            ],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )  # fmt: skip
        self.client = self.connect()
        expected = "SERVING" if self.wait_serving else "NOT_SERVING"
        wait_until(
            lambda: self.proc.poll() is not None or self.client.health(timeout=1) == expected,
            timeout=90,
        )
        if self.proc.poll() is not None:
            self.client.close()
            self._log.close()
            raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def metrics_text(self) -> str:
        url = f"http://{self.host}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read().decode()

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample from the live /metrics (0 if absent)."""
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0


@contextlib.contextmanager
def crowd(server: ServerProcess, n: int) -> Iterator[None]:
    """``n`` generations running on ``server`` for the duration of the block: each has sent
    its first character (so it is in the running batch) and none can end by itself before
    the block does (100,000 characters each); cancelled afterwards, and the block ends
    once the server has let them go."""
    streams = []
    try:
        for i in range(n):
            prompt = "JULIET:" if i % 2 else ""
            streams.append(
                server.client.generate(prompt, max_new_tokens=100_000, temperature=0.7, seed=i)
            )
            next(streams[-1])
        yield
        assert server.metric("chargpt_running_requests") >= n  # all still running
    finally:
        for stream in streams:
            stream.cancel()
        with contextlib.suppress(grpc.RpcError):
            for stream in streams:
                list(stream)
    wait_until(lambda: server.metric("chargpt_running_requests") == 0)


def ended_by_deadline(stream: Iterator[Any]) -> list[Any]:
    """A stream's messages, read to the end of a call with a deadline that the server ends
    for its deadline; ``[]`` when the call ended DEADLINE_EXCEEDED instead (the summary sent
    in time missed it on a machine that stalled the server longer than its margin)."""
    try:
        return list(stream)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
        return []
