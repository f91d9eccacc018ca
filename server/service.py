"""The ``chargpt.v1.LanguageModel`` gRPC service (grpc.aio): validate, submit, relay.

Handlers never touch the model; they check the request against the current model (its
vocabulary and limits), pin it to that model, hand it to the engine and turn the
engine's events into messages. All handlers run on one asyncio event loop; the engine
delivers each decode step's events to it in one wake-up.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from chargpt.sampling import SamplingParams
from chargpt.tokenizer import CharTokenizer, UnknownCharactersError
from chargpt.v1 import language_model_pb2 as pb
from chargpt.v1 import language_model_pb2_grpc as pb_grpc
from server.engine import (
    Chunk,
    Engine,
    EngineStoppedError,
    Event,
    Finished,
    GenerateParams,
    OverloadedError,
    ServedModel,
    TokenDetail,
)
from server.metrics import ServerMetrics

FINISH_REASONS = {
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "time_limit": pb.FINISH_REASON_TIME_LIMIT,
}
MAX_TOP_LOGPROBS = 20
MAX_CHARACTERS_PER_MESSAGE = 1024
T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    max_prompt_chars: int = 4096
    max_new_tokens: int = 2048
    default_max_new_tokens: int = 256
    max_stop_sequences: int = 8
    max_stop_chars: int = 64
    max_score_chars: int = 65536


class RequestError(Exception):
    """A request field is invalid; the message names it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _encode(tokenizer: CharTokenizer, text: str, field: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except UnknownCharactersError as exc:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {exc}") from None


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


class LanguageModelService(pb_grpc.LanguageModelServicer):
    def __init__(self, engine: Engine, metrics: ServerMetrics, limits: Limits) -> None:
        self.engine = engine
        self.metrics = metrics
        self.limits = limits
        self._model: ServedModel | None = None
        self._model_lock = threading.Lock()
        self.draining = False

    # ---- model management (called by the watcher) ---------------------------------

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
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        served = self.model
        if served is None:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "no model loaded yet")
        return served

    # ---- RPCs ---------------------------------------------------------------------

    async def Generate(  # noqa: N802 (gRPC method name)
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        generation = None
        try:
            served = self._require_model()
            params, per_message = self._generate_params(request, served, context)
            events: asyncio.Queue[Event] = asyncio.Queue()
            try:
                generation = self.engine.submit_generation(params, served, events)
            except OverloadedError as exc:
                raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
            except EngineStoppedError as exc:
                raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            vocab = served.loaded.tokenizer.vocab
            async for response in self._relay(events, vocab, per_message):
                yield response
        except RequestError as exc:
            code = exc.code
            self._count_rejection(exc.code)
            await context.abort(exc.code, str(exc))
        except (asyncio.CancelledError, GeneratorExit):  # the client went away
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if generation is not None and not generation.finished:
                generation.cancel()
                self.engine.wake()
            self._count("Generate", code, started)

    async def _relay(
        self, events: asyncio.Queue[Event], vocab: tuple[str, ...], per_message: int
    ) -> AsyncIterator[pb.GenerateResponse]:
        """Messages from a generation's events: at least ``per_message`` characters each,
        more when several are already waiting; the summary last."""
        text, tokens = "", []
        while True:
            event = await events.get()
            if isinstance(event, Chunk):
                text += event.text
                tokens.extend(event.tokens)
                if len(text) < per_message:
                    continue
                # Characters that piled up while this stream was sending go out together,
                # so a slow stream never falls further behind the engine.
                while not events.empty() and isinstance(event := events.get_nowait(), Chunk):
                    text += event.text
                    tokens.extend(event.tokens)
                yield pb.GenerateResponse(text=text, tokens=self._tokens(tokens, vocab))
                text, tokens = "", []
                if isinstance(event, Chunk):
                    continue
            if event.reason == "cancelled":
                return
            if event.reason == "error":
                raise RequestError(grpc.StatusCode.INTERNAL, "generation failed on the server")
            if event.reason == "shutdown":
                raise RequestError(grpc.StatusCode.UNAVAILABLE, "server shut down")
            yield pb.GenerateResponse(
                text=text, tokens=self._tokens(tokens, vocab), summary=self._summary(event)
            )
            return

    @staticmethod
    def _tokens(details: list[TokenDetail], vocab: tuple[str, ...]) -> list[pb.GeneratedToken]:
        return [
            pb.GeneratedToken(
                token=pb.TokenLogprob(id=d.id, text=vocab[d.id], logprob=d.logprob),
                top=[pb.TokenLogprob(id=i, text=vocab[i], logprob=lp) for i, lp in d.top],
            )
            for d in details
        ]

    @staticmethod
    def _summary(event: Finished) -> pb.GenerateSummary:
        return pb.GenerateSummary(
            finish_reason=FINISH_REASONS[event.reason],
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
            model=LanguageModelService._model_ref(event.model),
        )

    @staticmethod
    def _model_ref(served: ServedModel) -> pb.ModelRef:
        return pb.ModelRef(step=served.loaded.info.step, weights_sha256=served.loaded.file_sha256)

    def _generate_params(
        self, request: pb.GenerateRequest, served: ServedModel, context: grpc.aio.ServicerContext
    ) -> tuple[GenerateParams, int]:
        limits, tokenizer = self.limits, served.loaded.tokenizer
        if len(request.prompt) > limits.max_prompt_chars:
            raise _invalid(
                f"prompt: {len(request.prompt)} characters exceeds the limit of "
                f"{limits.max_prompt_chars}"
            )
        prompt_ids = _encode(tokenizer, request.prompt, "prompt") if request.prompt else [0]
        max_new = request.max_new_tokens or limits.default_max_new_tokens
        if max_new > limits.max_new_tokens:
            raise _invalid(
                f"max_new_tokens: {max_new} exceeds the server limit of {limits.max_new_tokens}"
            )
        temperature = request.temperature if request.HasField("temperature") else 1.0
        if not (math.isfinite(temperature) and temperature >= 0):
            raise _invalid(f"temperature: must be a finite number >= 0, got {temperature}")
        top_p = request.top_p if request.HasField("top_p") else 1.0
        if not (0 < top_p <= 1):
            raise _invalid(f"top_p: must be in (0, 1], got {top_p}")
        if request.top_k > tokenizer.vocab_size:
            raise _invalid(
                f"top_k: {request.top_k} exceeds the vocabulary size {tokenizer.vocab_size}"
            )
        stops = list(request.stop)
        if len(stops) > limits.max_stop_sequences:
            raise _invalid(
                f"stop: {len(stops)} sequences exceeds the limit of {limits.max_stop_sequences}"
            )
        for i, stop in enumerate(stops):
            if not stop:
                raise _invalid(f"stop[{i}]: empty stop sequence")
            if len(stop) > limits.max_stop_chars:
                raise _invalid(
                    f"stop[{i}]: {len(stop)} characters exceeds the limit of "
                    f"{limits.max_stop_chars}"
                )
        if request.top_logprobs > MAX_TOP_LOGPROBS:
            raise _invalid(
                f"top_logprobs: {request.top_logprobs} exceeds the limit of {MAX_TOP_LOGPROBS}"
            )
        if request.top_logprobs and not request.logprobs:
            raise _invalid("top_logprobs: requires logprobs to be set")
        if request.characters_per_message > MAX_CHARACTERS_PER_MESSAGE:
            raise _invalid(
                f"characters_per_message: {request.characters_per_message} exceeds the limit "
                f"of {MAX_CHARACTERS_PER_MESSAGE}"
            )
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        seed = request.seed if request.HasField("seed") else random.getrandbits(63)
        params = GenerateParams(
            prompt_ids=prompt_ids,
            max_new_tokens=max_new,
            sampling=SamplingParams(temperature, request.top_k, top_p),
            seed=seed,
            stop=stops,
            logprobs=request.logprobs,
            top_logprobs=request.top_logprobs,
            deadline=deadline,
        )
        return params, max(1, request.characters_per_message)

    async def Score(  # noqa: N802
        self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        return await self._unary("Score", context, self._score(request))

    async def _score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        served = self._require_model()
        tokenizer = served.loaded.tokenizer
        if not request.text:
            raise _invalid("text: must not be empty")
        total_chars = len(request.text) + len(request.context)
        if total_chars > self.limits.max_score_chars:
            raise _invalid(
                f"text: context + text is {total_chars} characters, over the limit of "
                f"{self.limits.max_score_chars}"
            )
        context_ids = _encode(tokenizer, request.context, "context") if request.context else [0]
        text_ids = _encode(tokenizer, request.text, "text")
        try:
            job = self.engine.submit_score(context_ids + text_ids, len(context_ids), served)
        except OverloadedError as exc:
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)) from None
        except EngineStoppedError as exc:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
        try:
            logprobs = await asyncio.wrap_future(job.result)
        except asyncio.CancelledError:
            job.cancel()
            self.engine.wake()
            raise
        total = math.fsum(logprobs)
        mean_nll = -total / len(logprobs)
        return pb.ScoreResponse(
            logprobs=logprobs,
            total_logprob=total,
            mean_nll=mean_nll,
            bits_per_character=mean_nll / math.log(2),
            perplexity=math.exp(mean_nll) if mean_nll < 700 else math.inf,
            scored_characters=len(logprobs),
            context_characters=len(request.context),
            model=self._model_ref(served),
        )

    async def GetModelInfo(  # noqa: N802
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return await self._unary("GetModelInfo", context, self._model_info_async())

    async def _model_info_async(self) -> pb.ModelInfo:
        return self._model_info()

    def _model_info(self) -> pb.ModelInfo:
        served = self._require_model()
        info, config = served.loaded.info, served.loaded.info.config
        return pb.ModelInfo(
            vocabulary="".join(info.vocab),
            vocab_size=config.vocab_size,
            block_size=config.block_size,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_embd=config.n_embd,
            architecture=(
                f"decoder-only transformer: {config.n_layer} layers, {config.n_head} heads, "
                f"{config.n_embd}-wide, learned positions, pre-LayerNorm, ReLU MLP"
            ),
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
        )

    # ---- bookkeeping --------------------------------------------------------------

    async def _unary(
        self, method: str, context: grpc.aio.ServicerContext, handler: Awaitable[T]
    ) -> T:
        started = time.monotonic()
        code = grpc.StatusCode.OK
        try:
            return await handler
        except RequestError as exc:
            code = exc.code
            self._count_rejection(exc.code)
            await context.abort(exc.code, str(exc))
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

    def _count_rejection(self, code: grpc.StatusCode) -> None:
        reason = {
            grpc.StatusCode.INVALID_ARGUMENT: "invalid",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "overloaded",
            grpc.StatusCode.UNAVAILABLE: "draining" if self.draining else "no_model",
        }.get(code)
        if reason:
            self.metrics.rejected.labels(reason).inc()
