"""Real ``chargpt serve`` replicas behind one DNS name, and streams run against them from
threads: what tests/test_replicas.py and tests/test_envoy.py share.

The replicas listen on loopback addresses of their own (127.0.0.2, ...) on one port, and
``tests/dns_server.py`` answers the name with the addresses of the replicas in service,
as a Kubernetes headless Service does with its ready pods.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from chargpt.v1 import language_model_pb2 as pb
from client.api import LanguageModelClient
from tests.dns_server import DNSServer
from tests.server_process import ServerProcess, port_free_on, wait_until

NAME = "replicas.test"
HOSTS = ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"]
STREAM_DEADLINE = 300.0  # seconds: a stream that hangs fails its test, it never hangs it


@dataclass
class Fleet:
    """The replicas (by address), the DNS server naming them and their common port."""

    checkpoint: Path
    dns: DNSServer
    port: int
    args: tuple[str, ...]
    replicas: dict[str, ServerProcess] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def dns_target(self) -> str:
        """The name, resolved by gRPC through this fleet's DNS server."""
        return f"dns://127.0.0.1:{self.dns.port}/{NAME}:{self.port}"

    def start(self, *hosts: str) -> None:
        """Replicas on ``hosts``, started together; each is SERVING when this returns,
        and in the DNS answer from then on."""
        servers = [
            ServerProcess(self.checkpoint, *self.args, host=h, port=self.port) for h in hosts
        ]
        with ThreadPoolExecutor(len(servers)) as pool:
            started = list(pool.map(self._enter, servers))
        for server in started:
            self.replicas[server.host] = server
        self.dns.addresses = [h for h in HOSTS if h in self.replicas]

    def _enter(self, server: ServerProcess) -> ServerProcess:
        return self._stack.enter_context(server)

    def count(self, host: str, method: str = "Generate") -> float:
        """Calls of ``method`` that replica ``host`` answered OK, by its own /metrics."""
        return self.replicas[host].metric("chargpt_requests_total", method=method, code="OK")

    def logs(self) -> str:
        return "\n".join(f"--- {host}:\n{s.log[-4000:]}" for host, s in self.replicas.items())

    @contextlib.contextmanager
    def explained(self) -> Iterator[None]:
        """A failure inside carries every replica's log."""
        try:
            yield
        except (AssertionError, TimeoutError, grpc.RpcError) as exc:
            raise AssertionError(f"{exc!r}\n{self.logs()}") from exc

    def close(self) -> None:
        """Every replica told to stop at once (each drains for --drain-delay first)."""
        for server in self.replicas.values():
            if server.proc.poll() is None:
                server.proc.send_signal(signal.SIGTERM)
        self._stack.close()


@contextlib.contextmanager
def fleet(checkpoint: Path, tmp: Path, *args: str) -> Iterator[Fleet]:
    """A DNS server and no replicas yet (``Fleet.start``); all stopped at the end."""
    own = tmp / "model.safetensors"
    shutil.copy(checkpoint, own)
    with DNSServer(NAME) as dns:
        running = Fleet(own, dns, port_free_on(HOSTS), args)
        try:
            yield running
        finally:
            running.close()


@dataclass
class Stream:
    """One Generate stream read on a thread of its own: its text, the summary at its end,
    or the status code it failed with."""

    client: LanguageModelClient
    max_new_tokens: int
    seed: int
    started: threading.Event = field(default_factory=threading.Event)
    text: list[str] = field(default_factory=list)
    summary: pb.GenerateSummary | None = None
    code: grpc.StatusCode | None = None
    details: str = ""
    call: object = None

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            self.call = self.client.generate(
                "ROMEO:", self.max_new_tokens, temperature=0.8, seed=self.seed,
                timeout=STREAM_DEADLINE,
            )  # fmt: skip
            for response in self.call:  # type: ignore[attr-defined]
                self.text.append(response.text)
                self.started.set()
                if response.HasField("summary"):
                    self.summary = response.summary
        except grpc.RpcError as exc:
            self.code, self.details = exc.code(), exc.details() or ""
        finally:
            self.started.set()

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()

    @property
    def ok(self) -> bool:
        return (
            self.done
            and self.code is None
            and self.summary is not None
            and self.summary.usage.generated_characters == self.max_new_tokens
        )

    def cancel(self) -> None:
        wait_until(lambda: self.call is not None, timeout=60)
        self.call.cancel()  # type: ignore[attr-defined]

    def join(self) -> None:
        self.thread.join(STREAM_DEADLINE + 30)
        assert self.done, "a stream neither ended nor failed"


def streams(
    client: LanguageModelClient, n: int, max_new_tokens: int, seed: int = 0
) -> list[Stream]:
    """``n`` streams, each once it has its first characters (or has failed)."""
    started = [Stream(client, max_new_tokens, seed + i) for i in range(n)]
    for stream in started:
        assert stream.started.wait(120), "a stream got no first message"
    return started
