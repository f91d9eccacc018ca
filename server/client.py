"""A small Python client for the chargpt inference service."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chargpt.v1 import language_model_pb2 as pb
from chargpt.v1 import language_model_pb2_grpc as pb_grpc
from server.credentials import CredentialError, read_credential

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LanguageModel"].full_name


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

    def channel(self, target: str) -> grpc.Channel:
        credentials = grpc.ssl_channel_credentials(self.ca, self.key, self.cert)
        options: list[tuple[str, str]] = []
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.secure_channel(target, credentials, options=options)


class LanguageModelClient:
    """``with LanguageModelClient("localhost:50051") as client: client.generate_text("ROMEO:")``

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
        channel = tls.channel(target) if tls is not None else grpc.insecure_channel(target)
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
