"""``chargpt generate``, ``chargpt score`` and ``chargpt health``: command-line clients.

No torch import here, so the container's health check starts fast.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from chargpt.settings import option
from chargpt.v1 import language_model_pb2 as pb
from server.client import LanguageModelClient

F = TypeVar("F", bound=Callable[..., Any])


class ServerError(click.ClickException):
    """The server could not be reached or refused the request."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def explain(error: grpc.RpcError, server: str) -> ServerError:
    """One line for each way a call can fail, told apart by status code and the server's
    ``chargpt-reason`` trailing metadata (never by the wording of the message)."""
    code, details = error.code(), error.details() or ""
    reason = dict(error.trailing_metadata() or ()).get("chargpt-reason")
    if reason == "no_model":
        return ServerError(f"server {server} is up but NOT_SERVING: {details}")
    if reason in ("draining", "shutdown"):
        return ServerError(f"server {server} is shutting down")
    if code == grpc.StatusCode.UNAVAILABLE:
        return ServerError(f"cannot reach a chargpt server at {server} ({details})")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ServerError(f"invalid request: {details}", exit_code=2)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ServerError(f"server {server} is overloaded: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerError(f"no answer from {server} within the deadline")
    return ServerError(f"server {server} answered {code.name}: {details}")


def server_option(func: F) -> F:
    func = option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Deadline for the call, in seconds (default: none).")(func)  # fmt: skip
    return option("--server", default="localhost:50051", help="host:port of the server.")(func)


def grpc_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except grpc.RpcError as exc:
            raise explain(exc, kwargs["server"]) from None

    return wrapper  # type: ignore[return-value]


@click.command()
@click.argument("prompt", default="")
@server_option
@option(
    "--max-new-tokens",
    type=click.IntRange(min=0),
    default=0,
    help="Characters to generate (0 = the server's default).",
)
@option("--temperature", type=float, default=None, help="0 = greedy (default 1.0).")
@option("--top-k", type=click.IntRange(min=0), default=0, help="0 = no limit.")
@option("--top-p", type=float, default=None, help="Nucleus sampling mass (default 1.0).")
@option("--seed", type=click.IntRange(min=0), default=None, help="Default: the server picks.")
@option("--stop", multiple=True, help="Stop sequence (repeatable).")
@option("--summary", is_flag=True, help="Print the finish reason, usage and timings to stderr.")
@grpc_errors
def generate(
    prompt: str,
    server: str,
    timeout: float | None,
    max_new_tokens: int,
    temperature: float | None,
    top_k: int,
    top_p: float | None,
    seed: int | None,
    stop: tuple[str, ...],
    summary: bool,
) -> None:
    """Stream a continuation of PROMPT; prints exactly the generated characters."""
    with LanguageModelClient(server, timeout) as client:
        final = None
        stream = client.generate(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop)
        for response in stream:
            sys.stdout.write(response.text)
            sys.stdout.flush()
            if response.HasField("summary"):
                final = response.summary
        if sys.stdout.isatty():
            sys.stdout.write("\n")
        if summary and final is not None:
            reason = pb.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_")
            click.echo(
                f"finish: {reason.lower()}, prompt {final.usage.prompt_characters} chars, "
                f"generated {final.usage.generated_characters}, seed {final.seed}, "
                f"queue {final.timings.queue_seconds * 1e3:.1f} ms, first token "
                f"{final.timings.time_to_first_token_seconds * 1e3:.1f} ms, total "
                f"{final.timings.total_seconds:.3f} s, model step {final.model.step}",
                err=True,
            )


@click.command()
@click.argument("text", required=False)
@option(
    "--file",
    "file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Score the contents of this UTF-8 file instead of TEXT.",
)
@option("--context", default="", help="Unscored text that comes before TEXT.")
@option("--per-char", is_flag=True, help="Also print each character's log-probability.")
@server_option
@grpc_errors
def score(
    text: str | None, file: str | None, context: str, per_char: bool, server: str,
    timeout: float | None,
) -> None:  # fmt: skip
    """Log-likelihood of TEXT (or --file) under the served model."""
    if (text is None) == (file is None):
        raise click.UsageError("give TEXT or --file, not both or neither")
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise click.UsageError(f"cannot read {file}: {exc}") from None
    assert text is not None
    with LanguageModelClient(server, timeout) as client:
        result = client.score(text, context)
    if per_char:
        for char, logprob in zip(text, result.logprobs, strict=True):
            click.echo(f"{char!r}\t{logprob:.4f}")
    perplexity = f"{result.perplexity:.3f}" if math.isfinite(result.perplexity) else "inf"
    click.echo(
        f"characters {result.scored_characters} | total logprob {result.total_logprob:.3f} | "
        f"mean nll {result.mean_nll:.4f} nats | {result.bits_per_character:.4f} bits/char | "
        f"perplexity {perplexity}"
    )


@click.command()
@option("--server", default="localhost:50051", help="host:port of the server.")
@option("--service", default="", help="Service to ask about ('' = the whole server).")
@option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=3.0,
    help="Seconds to wait for each answer.",
)
@option(
    "--wait",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Keep asking for up to this many seconds until the server is SERVING "
    "(for scripts that start one: chargpt serve ... & chargpt health --wait 60).",
)
def health(server: str, service: str, timeout: float, wait: float) -> int:
    """Ask grpc.health.v1; exit 0 only if the server answers SERVING."""
    deadline = time.monotonic() + wait
    with LanguageModelClient(server, timeout) as client:
        while True:
            try:
                status = client.health(service, wait_for_ready=wait > 0)
                line, error = f"{server}: {status}", False
            except grpc.RpcError as exc:
                status, error = "", True
                line = f"{server}: no answer ({exc.code().name}: {exc.details()})"
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    click.echo(line, err=error)
    return 0 if status == "SERVING" else 1
