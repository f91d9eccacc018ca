"""The ``chargpt.v1.LanguageModel`` gRPC service (grpc.aio): validate, submit, relay.

Handlers never touch the model; they check the request against the current model
(``server/validation.py``), pin it to that model, hand it to the engine and turn the
engine's events into messages. All handlers run on one asyncio event loop; the engine
delivers each iteration's events to it in one wake-up.

Requests are parsed by the service itself, not by gRPC, so that bytes that are not a valid
message (truncated, garbage, invalid UTF-8 in a string) get INVALID_ARGUMENT and a count,
not UNKNOWN and a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from chargpt.v1 import language_model_pb2 as pb
from server.engine import Engine, EngineStoppedError, OverloadedError
from server.errors import RequestError
from server.metrics import REJECTIONS, ServerMetrics
from server.requests import Chunk, Event, Finished, FinishReason, TokenDetail
from server.served import ServedModel
from server.validation import (
    InvalidRequestError,
    Limits,
    validate_generate,
    validate_score,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LanguageModel"].full_name
SUMMARY_REASONS = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.TIME_LIMIT: pb.FINISH_REASON_TIME_LIMIT,
}
T = TypeVar("T")
# ModelOptions' fields are GPTConfig's of the same names (tests/test_proto.py checks that
# every GPTConfig field is on ModelInfo or ModelOptions).
MODEL_OPTIONS = tuple(field.name for field in pb.ModelOptions.DESCRIPTOR.fields)


@dataclass(frozen=True)
class Unparsable:
    """What the request deserializer returns for bytes that are not a valid message."""

    message: str


def lenient_parser(message_type: type[Message]) -> Callable[[bytes], Message | Unparsable]:
    name = message_type.DESCRIPTOR.full_name

    def parse(data: bytes) -> Message | Unparsable:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError) as exc:
            return Unparsable(f"request is not a valid {name}: {exc}")

    return parse


class LanguageModelService:
    def __init__(self, engine: Engine, metrics: ServerMetrics, limits: Limits) -> None:
        self.engine = engine
        self.metrics = metrics
        self.limits = limits
        self._model: ServedModel | None = None
        self._model_lock = threading.Lock()
        self.draining = False

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers, with the lenient request parsers."""
        methods = {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, lenient_parser(pb.GenerateRequest),
                pb.GenerateResponse.SerializeToString,
            ),
            "Score": grpc.unary_unary_rpc_method_handler(
                self.Score, lenient_parser(pb.ScoreRequest), pb.ScoreResponse.SerializeToString
            ),
            "GetModelInfo": grpc.unary_unary_rpc_method_handler(
                self.GetModelInfo, lenient_parser(pb.GetModelInfoRequest),
                pb.ModelInfo.SerializeToString,
            ),
        }  # fmt: skip
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

    # ---- model management (called by the watcher) -------------------------------------

    def set_model(self, served: ServedModel) -> None:
        with self._model_lock:
            self._model = served
        info = served.loaded.info
        self.metrics.model_info.info({
            "step": str(info.step),
            "sha256": served.loaded.file_sha256,
            "run_name": info.run_name,
            "device": str(served.device),
            "dtype": str(served.dtype).removeprefix("torch."),
            "path": served.path,
        })  # fmt: skip
        self.metrics.model_step.set(info.step)
        self.metrics.model_loaded.set(1)

    @property
    def model(self) -> ServedModel | None:
        with self._model_lock:
            return self._model

    def _require_model(self) -> ServedModel:
        if self.draining:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "draining", "server is shutting down")
        served = self.model
        if served is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no_model", "no model loaded yet")
        return served

    # ---- RPCs ------------------------------------------------------------------------

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest | Unparsable, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        generation = None
        try:
            served = self._require_model()
            params = _checked(
                lambda r: validate_generate(
                    r, served.loaded.tokenizer, self.limits, self._deadline(context)
                ),
                request,
            )
            events: asyncio.Queue[Event] = asyncio.Queue()
            with _engine_errors():
                generation = self.engine.submit_generation(params, served, events)
            async for response in self._relay(
                events, served.vocab, params.characters_per_message,
                params.max_characters_per_message,
            ):  # fmt: skip
                yield response
        except RequestError as exc:
            code = exc.code
            await self._abort(context, exc)
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if generation is not None and not generation.finished:
                generation.cancel()
                self.engine.wake()
            self._count("Generate", code, started)

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else self.engine.clock() + remaining

    async def _relay(
        self,
        events: asyncio.Queue[Event],
        vocab: tuple[str, ...],
        per_message: int,
        at_most: int = 0,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Messages from a generation's events, the summary last.

        Each message carries every character produced since the previous one was taken
        (the stream's backlog, when its reader is slower than the engine), at least
        ``per_message`` of them and, if ``at_most``, at most that many: a longer backlog
        goes out as several messages back to back. Nothing waits for anything but the
        floor: a reader that keeps up gets each character as soon as it is delivered.
        Characters keep their order, none is dropped."""
        text, tokens = "", []
        end: Finished | None = None

        def take(event: Event) -> None:
            nonlocal text, end
            if isinstance(event, Chunk):
                text += event.text
                tokens.extend(event.tokens)
            else:
                end = event

        def cut() -> pb.GenerateResponse:
            nonlocal text, tokens
            n = min(len(text), at_most) if at_most else len(text)
            message = pb.GenerateResponse(text=text[:n], tokens=_tokens(tokens[:n], vocab))
            text, tokens = text[n:], tokens[n:]
            return message

        while end is None:
            if len(text) < per_message:
                take(await events.get())
                continue
            while end is None and not events.empty():  # the backlog, all of it
                take(events.get_nowait())
            if end is None or len(text) >= per_message:
                yield cut()
        while text and len(text) >= per_message:
            yield cut()  # what the summary found waiting, before the summary
        if end.reason == FinishReason.CANCELLED:
            return
        if end.reason == FinishReason.ERROR:
            raise RequestError(
                grpc.StatusCode.INTERNAL, "internal", "generation failed on the server"
            )
        if end.reason == FinishReason.SHUTDOWN:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "shutdown", "server shut down")
        yield pb.GenerateResponse(text=text, tokens=_tokens(tokens, vocab), summary=_summary(end))

    async def Score(  # noqa: N802
        self, request: pb.ScoreRequest | Unparsable, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        return await self._unary("Score", context, self._score(request))

    async def _score(self, request: pb.ScoreRequest | Unparsable) -> pb.ScoreResponse:
        served = self._require_model()
        params = _checked(
            lambda r: validate_score(r, served.loaded.tokenizer, self.limits), request
        )
        with _engine_errors():
            job = self.engine.submit_score(params, served)
        try:
            logprobs = await asyncio.wrap_future(job.result)
        except asyncio.CancelledError:
            job.cancel()
            self.engine.wake()
            raise
        except EngineStoppedError as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "shutdown", str(exc)) from None
        except Exception:  # logged by the engine; this request alone fails
            raise RequestError(
                grpc.StatusCode.INTERNAL, "internal", "scoring failed on the server"
            ) from None
        total = math.fsum(logprobs)
        mean_nll = -total / len(logprobs)
        return pb.ScoreResponse(
            logprobs=logprobs,
            total_logprob=total,
            mean_nll=mean_nll,
            bits_per_character=mean_nll / math.log(2),
            perplexity=math.exp(mean_nll) if mean_nll < 700 else math.inf,
            scored_characters=len(logprobs),
            context_characters=params.context_characters,
            model=_model_ref(served),
        )

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest | Unparsable, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return await self._unary("GetModelInfo", context, self._model_info(request))

    async def _model_info(self, request: pb.GetModelInfoRequest | Unparsable) -> pb.ModelInfo:
        _checked(lambda r: r, request)
        served = self._require_model()
        info, config = served.loaded.info, served.loaded.info.config
        return pb.ModelInfo(
            vocabulary="".join(info.vocab),
            vocab_size=config.vocab_size,
            block_size=config.block_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            architecture=config.describe(),
            parameters=served.loaded.model.num_parameters(),
            step=info.step,
            val_loss=info.val_loss if info.val_loss is not None else math.nan,
            train_loss=info.train_loss if info.train_loss is not None else math.nan,
            weights_sha256=served.loaded.file_sha256,
            run_name=info.run_name,
            dataset_sha256=info.dataset_sha256,
            device=str(served.device),
            dtype=str(served.dtype).removeprefix("torch."),
            checkpoint_path=served.path,
            created=info.created,
            loaded_at_unix=served.loaded_at,
            options=pb.ModelOptions(**{name: getattr(config, name) for name in MODEL_OPTIONS}),
            context_characters=config.context,
        )

    # ---- bookkeeping -----------------------------------------------------------------

    async def _unary(
        self, method: str, context: grpc.aio.ServicerContext, handler: Awaitable[T]
    ) -> T:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            return await handler
        except RequestError as exc:
            code = exc.code
            await self._abort(context, exc)
            raise  # unreachable: abort raises
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL
            raise
        finally:
            self._count(method, code, started)

    def _count(self, method: str, code: grpc.StatusCode, started: float) -> None:
        self.metrics.requests.labels(method, code.name).inc()
        self.metrics.request_duration.labels(method).observe(time.monotonic() - started)

    async def _abort(self, context: grpc.aio.ServicerContext, exc: RequestError) -> None:
        if exc.reason in REJECTIONS:
            self.metrics.rejected.labels(exc.reason).inc()
        await context.abort(exc.code, str(exc), exc.trailing_metadata())


def _checked(validate: Callable[[Any], T], request: Message | Unparsable) -> T:
    """``validate(request)``, with unparsable bytes and invalid fields as INVALID_ARGUMENT."""
    if isinstance(request, Unparsable):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "invalid", request.message)
    try:
        return validate(request)
    except InvalidRequestError as exc:
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, "invalid", str(exc), field=exc.field
        ) from None


@contextlib.contextmanager
def _engine_errors() -> Iterator[None]:
    """Engine refusals as gRPC statuses."""
    try:
        yield
    except OverloadedError as exc:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, "overloaded", str(exc)) from None
    except EngineStoppedError as exc:
        raise RequestError(grpc.StatusCode.UNAVAILABLE, "draining", str(exc)) from None


def _tokens(details: list[TokenDetail], vocab: tuple[str, ...]) -> list[pb.GeneratedToken]:
    return [
        pb.GeneratedToken(
            token=pb.TokenLogprob(id=d.id, text=vocab[d.id], logprob=d.logprob),
            top=[pb.TokenLogprob(id=i, text=vocab[i], logprob=lp) for i, lp in d.top],
        )
        for d in details
    ]


def _summary(event: Finished) -> pb.GenerateSummary:
    return pb.GenerateSummary(
        finish_reason=SUMMARY_REASONS[event.reason],
        usage=pb.Usage(
            prompt_characters=event.prompt_characters,
            generated_characters=event.generated_characters,
        ),
        seed=event.seed,
        timings=pb.Timings(
            queue_seconds=event.queue_seconds,
            time_to_first_token_seconds=event.time_to_first_token_seconds,
            total_seconds=event.total_seconds,
        ),
        stop_sequence=event.stop_sequence,
        model=_model_ref(event.model),
    )


def _model_ref(served: ServedModel) -> pb.ModelRef:
    return pb.ModelRef(step=served.loaded.info.step, weights_sha256=served.loaded.file_sha256)
