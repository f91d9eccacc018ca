"""``chargpt generate``, ``chargpt score`` and ``chargpt health``: command-line clients.

No torch import here, so the container's health check starts fast.

Each takes the connection's settings as flags or environment variables: ``--server``,
``--tls-ca`` (``CHARGPT_TLS_CA``), a client identity for mutual TLS, ``--tls-cert`` and
``--tls-key`` (``CHARGPT_CLIENT_CERT``, ``CHARGPT_CLIENT_KEY``: not ``CHARGPT_TLS_CERT``,
which is the server's own certificate in a server's environment),
``--tls-server-name``, and the bearer token from ``--token-file`` or ``CHARGPT_TOKEN``
(never a flag: command lines show in ``ps``). So a health check that runs inside the
server's container, with the server's environment, needs only ``CHARGPT_TLS_CA`` there
(and a client identity if the server requires one) to check a TLS server.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from chargpt.credentials import CredentialError, read_tokens
from chargpt.settings import InputError, option, sampling_options
from chargpt.v1 import language_model_pb2 as pb
from client.api import ClientTLS, LanguageModelClient, TargetError, parse_target

F = TypeVar("F", bound=Callable[..., Any])
TOKEN_ENV = "CHARGPT_TOKEN"
# gRPC's C core would also log each failed TLS handshake to stderr; these commands explain
# every failure in one line of their own. GRPC_VERBOSITY=ERROR (or lower) brings it back.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")


class ServerError(click.ClickException):
    """The server could not be reached or refused the request."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class Connection:
    """Where and how to connect: the server, TLS (None: plain text) and the token."""

    server: str
    tls: ClientTLS | None = None
    token: str | None = None

    @classmethod
    def from_options(
        cls,
        server: str,
        tls_ca: str | None,
        tls_cert: str | None,
        tls_key: str | None,
        tls_server_name: str | None,
        token_file: str | None,
    ) -> Connection:
        """Any TLS option means TLS; a file that cannot be read, or a malformed
        ``server``, is an InputError."""
        try:
            parse_target(server)
        except TargetError as exc:
            raise InputError(str(exc)) from None
        try:
            tls = None
            if any(value is not None for value in (tls_ca, tls_cert, tls_key, tls_server_name)):
                tls = ClientTLS.from_files(tls_ca, tls_cert, tls_key, tls_server_name)
            token = read_tokens(token_file)[0] if token_file else None
        except CredentialError as exc:
            raise InputError(str(exc)) from None
        return cls(server, tls, token or os.environ.get(TOKEN_ENV, "").strip() or None)

    def client(self, timeout: float | None) -> LanguageModelClient:
        return LanguageModelClient(self.server, timeout, tls=self.tls, token=self.token)


def explain(error: grpc.RpcError, connection: Connection) -> ServerError:
    """One line for each way a call can fail, told apart by status code and the server's
    ``chargpt-reason`` trailing metadata (never by the wording of the message)."""
    server = connection.server
    code, details = error.code(), error.details() or ""
    reason = dict(error.trailing_metadata() or ()).get("chargpt-reason")
    if reason == "no_model":
        return ServerError(f"server {server} is up but NOT_SERVING: {details}")
    if reason in ("draining", "shutdown"):
        return ServerError(f"server {server} is shutting down")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return ServerError(
            f"server {server} refused the call: {details}. Give a token it accepts with "
            f"--token-file PATH or the {TOKEN_ENV} environment variable"
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        hint = connection_hint(details, connection)
        return ServerError(
            f"cannot reach a chargpt server at {server} ({details})" + (f"; {hint}" if hint else "")
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ServerError(f"invalid request: {details}", exit_code=2)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ServerError(f"server {server} is overloaded: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return ServerError(f"no answer from {server} within the deadline")
    return ServerError(f"server {server} answered {code.name}: {details}")


# gRPC's words for a failed TLS handshake (the TLS library's names for errors), and the fix.
TLS_FAILURES = (
    ("Hostname Verification", "its certificate is not for this host name: connect by a "
     "name the certificate lists, or give --tls-server-name NAME"),
    ("CERTIFICATE_VERIFY_FAILED", "its certificate is not signed by a CA this client "
     "trusts: give --tls-ca with the CA that signed it"),
    ("WRONG_VERSION_NUMBER", "it does not speak TLS on this port: leave out the --tls-* "
     "options, or check the port"),
    ("handshake", "the TLS handshake failed: check the --tls-* options against the server's"),
)  # fmt: skip


def connection_hint(details: str, connection: Connection) -> str | None:
    """What to fix when the connection itself failed. No server answered to give a
    reason, so this reads gRPC's own description of the failure."""
    for words, fix in TLS_FAILURES:
        if words.lower() in details.lower():
            return fix
    if "Socket closed" not in details and "Connection reset" not in details:
        return None
    if connection.tls is None:
        return (
            "it closed the connection: if it serves TLS, give --tls-ca (the CA that signed "
            "its certificate)"
        )
    if connection.tls.cert is None:
        return (
            "it closed the TLS connection: if it requires client certificates (mutual TLS), "
            "give --tls-cert and --tls-key"
        )
    return (
        "it closed the TLS connection: it may not accept this client certificate "
        "(is it signed by the server's --tls-client-ca?)"
    )


def connection_options(func: F) -> F:
    """``--server``, the TLS options and ``--token-file``, given to the command as one
    ``connection`` argument."""
    names = ("server", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token_file")

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in names}
        return func(*args, connection=Connection.from_options(**given), **kwargs)

    path = click.Path(dir_okay=False)
    decorators = [
        option("--server", default="localhost:50051",
               help="host:port of the server; or replicas to spread calls over, those "
               "that report SERVING: dns:///NAME:PORT (every address of NAME, looked up "
               "again as they change) or a comma-separated list of ip:port."),
        option("--tls-ca", type=path, default=None,
               help="PEM CA certificate(s) that signed the server's certificate: connect "
               "over TLS. Any --tls-* option means TLS; without this one the system's CAs "
               "are trusted."),
        option("--tls-cert", type=path, default=None, envvar="CHARGPT_CLIENT_CERT",
               help="PEM client certificate, for a server that requires one (mutual TLS)."),
        option("--tls-key", type=path, default=None, envvar="CHARGPT_CLIENT_KEY",
               help="PEM private key of --tls-cert."),
        option("--tls-server-name", default=None,
               help="Name the server's certificate must carry (default: the host of --server)."),
        option("--token-file", type=path, default=None,
               help=f"File whose first token (same format as the server's "
               f"--auth-token-file) is sent as 'authorization: Bearer'. Without it: the "
               f"{TOKEN_ENV} environment variable, if set."),
    ]  # fmt: skip
    for decorate in reversed(decorators):
        wrapper = decorate(wrapper)
    return wrapper  # type: ignore[return-value]


def timeout_option(func: F) -> F:
    return option("--timeout", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Deadline for the call, in seconds (default: none).")(func)  # fmt: skip


def grpc_errors(func: F) -> F:
    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except grpc.RpcError as exc:
            raise explain(exc, kwargs["connection"]) from None

    return wrapper  # type: ignore[return-value]


@click.command()
@click.argument("prompt", default="")
@connection_options
@timeout_option
@option(
    "--max-new-tokens",
    type=click.IntRange(min=0),
    default=0,
    help="Characters to generate (0 = the server's default).",
)
@sampling_options(on_server=True, seed_help="Random seed (default: the server picks).")
@option("--stop", multiple=True, help="Stop sequence (repeatable).")
@option("--summary", is_flag=True, help="Print the finish reason, usage and timings to stderr.")
@grpc_errors
def generate(
    prompt: str,
    connection: Connection,
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
    with connection.client(timeout) as client:
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
@connection_options
@timeout_option
@grpc_errors
def score(
    text: str | None, file: str | None, context: str, per_char: bool, connection: Connection,
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
    with connection.client(timeout) as client:
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
@connection_options
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
def health(connection: Connection, service: str, timeout: float, wait: float) -> int:
    """Ask grpc.health.v1 (open to callers without a token); exit 0 only if the server
    answers SERVING (over several replicas: if one of them does, the one asked)."""
    server = connection.server
    deadline = time.monotonic() + wait
    with connection.client(timeout) as client:
        while True:
            try:
                status = client.health(service, wait_for_ready=wait > 0)
                line, error = f"{server}: {status}", False
            except grpc.RpcError as exc:
                status, error = "", True
                line = f"{server}: no answer ({exc.code().name}: {exc.details()})"
                hint = connection_hint(exc.details() or "", connection)
                line += f"; {hint}" if hint else ""
            if status == "SERVING" or time.monotonic() >= deadline:
                break
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
    click.echo(line, err=error)
    return 0 if status == "SERVING" else 1
