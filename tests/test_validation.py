"""Request validation without gRPC: every bad field is named, every message is bounded."""

from __future__ import annotations

import math

import pytest

from chargpt.tokenizer import CharTokenizer
from chargpt.v1 import language_model_pb2 as pb
from server.config import Limits
from server.validation import (
    MAX_MESSAGE_CHARS,
    InvalidRequestError,
    validate_generate,
    validate_score,
)

TOKENIZER = CharTokenizer.from_text("\n !,.:ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
LIMITS = Limits(max_new_tokens=100_000)


def generate(**fields: object) -> pb.GenerateRequest:
    return pb.GenerateRequest(**fields)  # type: ignore[arg-type]


BAD_GENERATE = [
    (generate(prompt="ab~c@~"), "prompt", "prompt: characters not in the vocabulary: '~' at positions 2, 5; '@' at position 4"),
    (generate(prompt="x" * 5000), "prompt", "prompt: 5000 characters exceeds the limit of 4096"),
    (generate(prompt="a", max_new_tokens=1_000_000), "max_new_tokens", "max_new_tokens: 1000000 exceeds the server limit of 100000"),
    (generate(prompt="a", temperature=-0.5), "temperature", "temperature: must be a finite number >= 0"),
    (generate(prompt="a", temperature=math.nan), "temperature", "temperature"),
    (generate(prompt="a", temperature=math.inf), "temperature", "temperature"),
    (generate(prompt="a", top_p=0.0), "top_p", "top_p: must be in (0, 1]"),
    (generate(prompt="a", top_p=1.5), "top_p", "top_p"),
    (generate(prompt="a", top_k=TOKENIZER.vocab_size + 1), "top_k", "top_k: 59 exceeds the vocabulary size 58"),
    (generate(prompt="a", stop=["x"] * 9), "stop", "stop: 9 sequences exceeds the limit of 8"),
    (generate(prompt="a", stop=["ok", ""]), "stop[1]", "stop[1]: empty stop sequence"),
    (generate(prompt="a", stop=["y" * 65]), "stop[0]", "stop[0]: 65 characters exceeds the limit of 64"),
    (generate(prompt="a", logprobs=True, top_logprobs=21), "top_logprobs", "top_logprobs: 21 alternatives exceeds"),
    (generate(prompt="a", top_logprobs=2), "top_logprobs", "top_logprobs: requires logprobs"),
    (generate(prompt="a", characters_per_message=5000), "characters_per_message", "characters_per_message: 5000"),
    (generate(prompt="a", characters_per_message=8, max_characters_per_message=4), "max_characters_per_message", "max_characters_per_message: 4 is below characters_per_message (8)"),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "field", "message"), BAD_GENERATE)
def test_bad_generate_requests_name_the_field(
    request_: pb.GenerateRequest, field: str, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        validate_generate(request_, TOKENIZER, LIMITS)
    assert err.value.field == field
    assert str(err.value).startswith(message)


BAD_SCORE = [
    (pb.ScoreRequest(text=""), "text", "text: must not be empty"),
    (pb.ScoreRequest(text="abc", context="~"), "context", "context: characters not in the vocabulary: '~' at position 0"),
    (pb.ScoreRequest(text="a~"), "text", "text: characters not in the vocabulary: '~' at position 1"),
    (pb.ScoreRequest(text="a" * 60_000, context="b" * 6000), "text", "text: context + text is 66000 characters, over the limit of 65536"),
]  # fmt: skip


@pytest.mark.parametrize(("request_", "field", "message"), BAD_SCORE)
def test_bad_score_requests_name_the_field(
    request_: pb.ScoreRequest, field: str, message: str
) -> None:
    with pytest.raises(InvalidRequestError) as err:
        validate_score(request_, TOKENIZER, LIMITS)
    assert (err.value.field, str(err.value)) == (field, message)


def distinct_foreign_characters(n: int) -> str:
    return "".join(chr(0x4E00 + i) for i in range(n))  # CJK ideographs


@pytest.mark.parametrize("field", ["prompt", "text", "context"])
def test_messages_about_thousands_of_distinct_characters_are_bounded(field: str) -> None:
    foreign = distinct_foreign_characters(4000)
    limits = Limits(max_prompt_chars=10_000, max_score_chars=100_000)
    with pytest.raises(InvalidRequestError) as err:
        if field == "prompt":
            validate_generate(pb.GenerateRequest(prompt=foreign), TOKENIZER, limits)
        else:
            request = pb.ScoreRequest(text="abc", context="")
            setattr(request, field, foreign)
            validate_score(request, TOKENIZER, limits)
    message = str(err.value)
    assert len(message) <= MAX_MESSAGE_CHARS
    assert message.startswith(f"{field}: characters not in the vocabulary: '一' at position 0")
    assert "and 3980 more distinct characters" in message


def test_stop_sequences_of_foreign_characters_are_bounded_too() -> None:
    limits = Limits(max_stop_chars=10_000)
    request = pb.GenerateRequest(prompt="a", stop=["", distinct_foreign_characters(5000)])
    with pytest.raises(InvalidRequestError, match=r"^stop\[0\]: empty"):
        validate_generate(request, TOKENIZER, limits)
    long = pb.GenerateRequest(prompt="a", stop=[distinct_foreign_characters(5000)])
    with pytest.raises(InvalidRequestError) as err:
        validate_generate(long, TOKENIZER, Limits())
    assert len(str(err.value)) <= MAX_MESSAGE_CHARS


def test_a_good_request_becomes_the_engines_parameters() -> None:
    request = pb.GenerateRequest(
        prompt="ROMEO:", max_new_tokens=5, temperature=0.5, top_k=3, top_p=0.9, seed=7,
        stop=["\n\n"], logprobs=True, top_logprobs=2, characters_per_message=4,
    )  # fmt: skip
    params = validate_generate(request, TOKENIZER, LIMITS, deadline=12.5)
    assert params.prompt_ids == TOKENIZER.encode("ROMEO:")
    assert (params.max_new_tokens, params.seed, params.stop) == (5, 7, ["\n\n"])
    assert (params.sampling.temperature, params.sampling.top_k) == (0.5, 3)
    assert params.sampling.top_p == pytest.approx(0.9)
    assert (params.top_logprobs, params.characters_per_message, params.deadline) == (2, 4, 12.5)
    defaults = validate_generate(pb.GenerateRequest(), TOKENIZER, LIMITS, pick_seed=lambda: 99)
    assert defaults.prompt_ids == [0] and defaults.max_new_tokens == 256 and defaults.seed == 99
    assert defaults.sampling.temperature == 1.0 and defaults.characters_per_message == 1
    score = validate_score(pb.ScoreRequest(text="ab", context="C"), TOKENIZER, LIMITS)
    assert score.ids == TOKENIZER.encode("Cab") and score.first_target == 1
    assert validate_score(pb.ScoreRequest(text="ab"), TOKENIZER, LIMITS).ids[0] == 0


def test_the_servers_stream_interval_is_the_floor_of_requests_that_leave_it_unset() -> None:
    limits = Limits(stream_interval=8)
    unset = validate_generate(pb.GenerateRequest(), TOKENIZER, limits)
    assert (unset.characters_per_message, unset.max_characters_per_message) == (8, 0)
    own = validate_generate(pb.GenerateRequest(characters_per_message=2), TOKENIZER, limits)
    assert own.characters_per_message == 2
    # A ceiling below the server's floor lowers the floor (the request did not ask for it).
    capped = validate_generate(pb.GenerateRequest(max_characters_per_message=3), TOKENIZER, limits)
    assert (capped.characters_per_message, capped.max_characters_per_message) == (3, 3)
    with pytest.raises(ValueError, match="stream_interval"):
        Limits(stream_interval=0)


def test_tiny_temperatures_are_accepted() -> None:
    for temperature in (1e-38, 1e-45):
        params = validate_generate(generate(prompt="a", temperature=temperature), TOKENIZER, LIMITS)
        assert params.sampling.temperature > 0
