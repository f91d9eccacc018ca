"""A small Python client for the chargpt inference service."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from chargpt.v1 import language_model_pb2 as pb
from chargpt.v1 import language_model_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LanguageModel"].full_name


class LanguageModelClient:
    """``with LanguageModelClient("localhost:50051") as client: client.generate_text("ROMEO:")``"""

    def __init__(self, target: str, timeout: float | None = None) -> None:
        self.target = target
        self.timeout = timeout
        self.channel = grpc.insecure_channel(target)
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
