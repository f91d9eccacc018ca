"""A small Python client for the chargpt inference service."""

from __future__ import annotations

import collections
import ipaddress
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chargpt.credentials import CredentialError, read_credential
from chargpt.v1 import language_model_pb2 as pb
from chargpt.v1 import language_model_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LanguageModel"].full_name
# Over several replicas: a call goes to the next replica that reports SERVING (gRPC's
# round_robin with client-side health checking, proposal A17), never only the first one.
BALANCED_OPTIONS = (
    ("grpc.service_config", json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
    })),
    ("grpc.service_config_disable_resolution", 1),  # this config, not one from DNS TXT records
    # A name is looked up again when a connection closes (a replica gone, or closed by
    # the server's --max-connection-age): at most once a second, not gRPC's default 30 s.
    ("grpc.dns_min_time_between_resolutions_ms", 1000),
)  # fmt: skip


class TargetError(ValueError):
    """A --server value that is not an address, a list of addresses or a dns: name."""


@dataclass(frozen=True)
class Target:
    """Where a client connects: ``uri`` as gRPC takes it, and whether it names several
    replicas to balance over (a list, or a ``dns:`` name, which may resolve to many)."""

    uri: str
    balanced: bool

    @property
    def options(self) -> tuple[tuple[str, Any], ...]:
        return BALANCED_OPTIONS if self.balanced else ()


def parse_target(server: str) -> Target:
    """``host:port`` (one server, as always), ``dns:///name:port`` (every address the name
    resolves to, looked up again as replicas come and go), a comma-separated list of
    ``ip:port`` / ``[ipv6]:port``, or a gRPC ``ipv4:``/``ipv6:``/``unix:`` URI. Raises
    TargetError naming a malformed entry."""
    server = server.strip()
    scheme = server.split(":", 1)[0].lower()
    if scheme == "dns":
        rest = server[4:]  # dns:NAME, or dns://AUTHORITY/NAME with the DNS server to ask
        if not (rest[2:].partition("/")[2] if rest.startswith("//") else rest):
            raise TargetError(f"--server {server!r}: a dns: target names a host, as in "
                              "dns:///NAME:PORT")  # fmt: skip
        return Target(server, balanced=True)
    if scheme in ("ipv4", "ipv6", "unix", "unix-abstract"):
        return Target(server, balanced="," in server)
    if "," not in server:
        if not server:
            raise TargetError("--server is empty: give host:port")
        return Target(server, balanced=False)
    families = {ip_port(entry.strip()) for entry in server.split(",")}
    if len(families) > 1:
        raise TargetError(f"--server {server!r} mixes IPv4 and IPv6 addresses: give one kind")
    entries = ",".join(entry.strip() for entry in server.split(","))
    return Target(f"{families.pop()}:{entries}", balanced=True)


def ip_port(entry: str) -> str:
    """``ipv4`` or ``ipv6`` for an ``ip:port`` entry of a list; TargetError naming it."""
    host, sep, port = entry.rpartition(":")
    problem = None
    if not entry:
        problem = "an empty entry"
    elif not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        problem = "no port from 1 to 65535"
    else:
        bracketed = host.startswith("[") and host.endswith("]")
        try:
            address = ipaddress.ip_address(host[1:-1] if bracketed else host)
        except ValueError:
            address = None
        if address is None or (address.version == 6) != bracketed:
            problem = "not an IP address"
    if problem is not None:
        raise TargetError(
            f"--server list entry {entry!r}: {problem}. A list takes ip:port or [ipv6]:port "
            "entries; for a name with several addresses give dns:///NAME:PORT"
        )
    return "ipv6" if host.startswith("[") else "ipv4"


@dataclass(frozen=True)
class ClientTLS:
    """How the client speaks TLS: ``ca`` is the PEM CA certificate(s) the server's
    certificate must be signed by (None: the system's trusted CAs); ``cert`` and ``key`` a
    client certificate for servers that require one (mutual TLS); ``server_name`` the name
    the server's certificate must carry, when not the host the client connects to."""

    ca: bytes | None = None
    cert: bytes | None = None
    key: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(
        cls,
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
    ) -> ClientTLS:
        """Read the PEM files; CredentialError names one that cannot be read."""
        if (cert is None) != (key is None):
            raise CredentialError("a client certificate needs its key: give both or neither")
        return cls(
            ca=read_credential(ca, "TLS CA") if ca is not None else None,
            cert=read_credential(cert, "TLS client certificate") if cert is not None else None,
            key=read_credential(key, "TLS client key") if key is not None else None,
            server_name=server_name,
        )

    def channel(self, target: str, options: Iterable[tuple[str, Any]] = ()) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        options = list(options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(target, credentials, options=options)


class LanguageModelClient:
    """``with LanguageModelClient("localhost:50051") as client: client.generate_text("ROMEO:")``

    ``target`` is one server, or several replicas (``parse_target``): a comma-separated
    list of ``ip:port`` or a ``dns:///name:port``, whose calls are spread over the
    replicas that report SERVING (a ValueError, TargetError, for a malformed one).
    ``tls`` connects over TLS (plain text without it); ``token`` is sent with every call
    as ``authorization: Bearer <token>`` metadata, also by stubs made on ``.channel``.
    """

    def __init__(
        self,
        target: str,
        timeout: float | None = None,
        *,
        tls: ClientTLS | None = None,
        token: str | None = None,
    ) -> None:
        self.target = target
        self.timeout = timeout
        parsed = parse_target(target)
        channel = (
            tls.channel(parsed.uri, parsed.options)
            if tls is not None
            else grpc.insecure_channel(parsed.uri, options=parsed.options)
        )
        if token:
            channel = grpc.intercept_channel(channel, BearerToken(token))
        self.channel = channel
        self.stub = pb_grpc.LanguageModelStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def generate(
        self,
        prompt: str = "",
        max_new_tokens: int = 0,
        temperature: float | None = None,
        top_k: int = 0,
        top_p: float | None = None,
        seed: int | None = None,
        stop: Iterable[str] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        characters_per_message: int = 0,
        max_characters_per_message: int = 0,
        timeout: float | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        """The response stream; cancel it with ``.cancel()`` on the returned iterator."""
        request = pb.GenerateRequest(
            prompt=prompt,
            max_new_tokens=max_new_tokens,
            top_k=top_k,
            stop=list(stop),
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            characters_per_message=characters_per_message,
            max_characters_per_message=max_characters_per_message,
        )
        if temperature is not None:
            request.temperature = temperature
        if top_p is not None:
            request.top_p = top_p
        if seed is not None:
            request.seed = seed
        return self.stub.Generate(request, timeout=timeout or self.timeout)

    def generate_text(self, prompt: str = "", **kwargs: object) -> tuple[str, pb.GenerateSummary]:
        """The whole generated text and the final summary."""
        text = []
        summary = pb.GenerateSummary()
        for response in self.generate(prompt, **kwargs):  # type: ignore[arg-type]
            text.append(response.text)
            if response.HasField("summary"):
                summary = response.summary
        return "".join(text), summary

    def score(self, text: str, context: str = "", timeout: float | None = None) -> pb.ScoreResponse:
        return self.stub.Score(
            pb.ScoreRequest(text=text, context=context), timeout=timeout or self.timeout
        )

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout or self.timeout)

    def health(
        self, service: str = "", timeout: float | None = None, wait_for_ready: bool = False
    ) -> str:
        """SERVING, NOT_SERVING, ... (the grpc.health.v1 status name). ``wait_for_ready``:
        wait (up to the timeout) for a server that is not listening yet."""
        response = self.health_stub.Check(
            health_pb2.HealthCheckRequest(service=service),
            timeout=timeout or self.timeout,
            wait_for_ready=wait_for_ready,
        )
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LanguageModelClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class _CallDetails(
    collections.namedtuple(
        "_CallDetails",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class BearerToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds ``authorization: Bearer <token>`` to the metadata of every call."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(
            details.method, details.timeout, [*(details.metadata or ()), self._header],
            details.credentials, details.wait_for_ready, details.compression,
        )  # fmt: skip

    def _intercept(self, continuation: Callable[..., Any], details: Any, request: Any) -> Any:
        return continuation(self._with_token(details), request)

    intercept_unary_unary = _intercept
    intercept_unary_stream = _intercept
    intercept_stream_unary = _intercept
    intercept_stream_stream = _intercept
