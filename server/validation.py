"""Checking requests against the served model and the server's limits, without gRPC:
a request message in, the engine's parameters out, or ``InvalidRequestError`` naming the field.

Every message is bounded (``MAX_MESSAGE_CHARS``): gRPC clients drop a status whose
trailers exceed 8-16 KiB, so a request that echoes thousands of bad characters must
still get a readable INVALID_ARGUMENT, not a transport error.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from chargpt.sampling import SamplingParams
from chargpt.tokenizer import CharTokenizer, UnknownCharactersError
from chargpt.v1 import language_model_pb2 as pb
from server.config import Limits
from server.requests import GenerateParams, ScoreParams

MAX_TOP_LOGPROBS = 20
MAX_CHARACTERS_PER_MESSAGE = 1024
MAX_MESSAGE_CHARS = 1024


def bounded(message: str, limit: int = MAX_MESSAGE_CHARS) -> str:
    if len(message) <= limit:
        return message
    return f"{message[: limit - 40]} ... ({len(message) - limit + 40} more characters)"


class InvalidRequestError(ValueError):
    """A request field is invalid. The message names the field first, and is bounded."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(bounded(f"{field}: {problem}"))
        self.field = field


def _encode(tokenizer: CharTokenizer, text: str, field: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except UnknownCharactersError as exc:
        raise InvalidRequestError(field, str(exc)) from None


def _check_at_most(field: str, value: int, limit: int, what: str) -> None:
    if value > limit:
        raise InvalidRequestError(field, f"{value} {what} exceeds the limit of {limit}")


def validate_generate(
    request: pb.GenerateRequest,
    tokenizer: CharTokenizer,
    limits: Limits,
    deadline: float | None = None,
    pick_seed: Callable[[], int] = lambda: random.getrandbits(63),
) -> GenerateParams:
    """The engine's parameters for a GenerateRequest, or InvalidRequestError."""
    _check_at_most("prompt", len(request.prompt), limits.max_prompt_chars, "characters")
    prompt_ids = _encode(tokenizer, request.prompt, "prompt") if request.prompt else [0]
    max_new = request.max_new_tokens or limits.default_max_new_tokens
    if max_new > limits.max_new_tokens:
        raise InvalidRequestError(
            "max_new_tokens", f"{max_new} exceeds the server limit of {limits.max_new_tokens}"
        )
    temperature = request.temperature if request.HasField("temperature") else 1.0
    if not (math.isfinite(temperature) and temperature >= 0):
        raise InvalidRequestError("temperature", f"must be a finite number >= 0, got {temperature}")
    top_p = request.top_p if request.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidRequestError("top_p", f"must be in (0, 1], got {top_p}")
    if request.top_k > tokenizer.vocab_size:
        raise InvalidRequestError(
            "top_k", f"{request.top_k} exceeds the vocabulary size {tokenizer.vocab_size}"
        )
    stops = list(request.stop)
    _check_at_most("stop", len(stops), limits.max_stop_sequences, "sequences")
    for i, stop in enumerate(stops):
        if not stop:
            raise InvalidRequestError(f"stop[{i}]", "empty stop sequence")
        _check_at_most(f"stop[{i}]", len(stop), limits.max_stop_chars, "characters")
    _check_at_most("top_logprobs", request.top_logprobs, MAX_TOP_LOGPROBS, "alternatives")
    if request.top_logprobs and not request.logprobs:
        raise InvalidRequestError("top_logprobs", "requires logprobs to be set")
    _check_at_most(
        "characters_per_message", request.characters_per_message,
        MAX_CHARACTERS_PER_MESSAGE, "characters",
    )  # fmt: skip
    at_most = request.max_characters_per_message
    if at_most and at_most < request.characters_per_message:
        raise InvalidRequestError(
            "max_characters_per_message",
            f"{at_most} is below characters_per_message ({request.characters_per_message})",
        )
    per_message = request.characters_per_message or limits.stream_interval
    return GenerateParams(
        prompt_ids=prompt_ids,
        max_new_tokens=max_new,
        sampling=SamplingParams(temperature, request.top_k, top_p),
        seed=request.seed if request.HasField("seed") else pick_seed(),
        stop=stops,
        logprobs=request.logprobs,
        top_logprobs=request.top_logprobs,
        characters_per_message=min(per_message, at_most) if at_most else per_message,
        max_characters_per_message=at_most,
        deadline=deadline,
    )


def validate_score(
    request: pb.ScoreRequest, tokenizer: CharTokenizer, limits: Limits
) -> ScoreParams:
    """The engine's parameters for a ScoreRequest, or InvalidRequestError."""
    if not request.text:
        raise InvalidRequestError("text", "must not be empty")
    total = len(request.text) + len(request.context)
    if total > limits.max_score_chars:
        raise InvalidRequestError(
            "text",
            f"context + text is {total} characters, over the limit of {limits.max_score_chars}",
        )
    context_ids = _encode(tokenizer, request.context, "context") if request.context else [0]
    text_ids = _encode(tokenizer, request.text, "text")
    return ScoreParams(context_ids + text_ids, len(context_ids), len(request.context))
