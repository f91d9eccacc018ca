"""Bearer-token authentication: who may call the server.

``TokenAuthInterceptor`` asks every call for ``authorization: Bearer <token>`` metadata
naming one of the tokens of the ``--auth-token-file``, except calls to the services left
open (``grpc.health.v1``: orchestrators probe it without credentials). A refused call
ends UNAUTHENTICATED with ``chargpt-reason: unauthenticated``, like the service's own
refusals, before its request is even parsed; it is counted and logged, never with the
token it carried.

``TokenFile`` re-reads the file whenever it changes, so tokens rotate without a restart:
each call is checked once, when it arrives, against the tokens of that moment, so a call
already running is never cut short by a rotation. A new version that cannot be used
(unreadable, empty, a bad line) is refused with a log line and the tokens before it stay.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health

from chargpt.credentials import CredentialError, read_tokens
from server.errors import RequestError
from server.metrics import ServerMetrics
from server.watch import Poller, file_signature

log = logging.getLogger(__name__)
OPEN_SERVICES = frozenset({health.SERVICE_NAME})
Metadata = Sequence[tuple[str, str | bytes]]


class TokenSet:
    """Tokens compared in constant time: the presented token's SHA-256 against every
    token's with ``hmac.compare_digest``, so neither the tokens' contents, nor their
    lengths, nor which of them matched shows in how long the answer takes."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple(_digest(token) for token in tokens)

    def __len__(self) -> int:
        return len(self._digests)

    def __str__(self) -> str:
        return f"{len(self)} token{'' if len(self) == 1 else 's'}"

    def accepts(self, token: str) -> bool:
        presented = _digest(token)
        matched = False
        for digest in self._digests:  # every one, even after a match
            matched |= hmac.compare_digest(digest, presented)
        return matched


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def bearer_token(metadata: Metadata | None) -> tuple[str | None, str]:
    """The token of the call's ``authorization: Bearer <token>`` metadata, or None and
    what is wrong (told to the caller: it never includes what they sent)."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None, "missing bearer token: send 'authorization: Bearer <token>' metadata"
    scheme, _, token = str(values[0]).partition(" ")
    if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
        return None, "the authorization metadata is not one 'Bearer <token>'"
    return token.strip(), ""


class TokenFile:
    """The tokens of a token file, re-read whenever the file changes (see the module
    docstring). Raises CredentialError at construction if the file cannot be used."""

    def __init__(self, path: Path, metrics: ServerMetrics, poll_seconds: float = 1.0) -> None:
        self.path = path
        self.metrics = metrics
        self._seen = file_signature(path)
        self.tokens = TokenSet(read_tokens(path))
        self._poller = Poller("token-watcher", self.check_once, poll_seconds)

    def accepts(self, token: str) -> bool:
        return self.tokens.accepts(token)  # one read of the attribute: the old set or the new

    def check_once(self) -> bool:
        """Re-read the file if it changed; True if new tokens took effect."""
        signature = file_signature(self.path)
        if signature == self._seen:
            return False
        self._seen = signature
        try:
            tokens = TokenSet(read_tokens(self.path))
        except CredentialError as exc:
            self.metrics.token_reloads.labels("refused").inc()
            log.error("refused the new token file: %s; keeping %s", exc, self.tokens)
            return False
        self.tokens = tokens
        self.metrics.token_reloads.labels("loaded").inc()
        log.info("token file %s changed: now accepting %s", self.path, tokens)
        return True

    def start(self) -> None:
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through to its handler only with an accepted bearer token (calls to
    ``open_services`` always); hands any other a handler of the same kind that refuses it."""

    def __init__(
        self,
        tokens: TokenFile | TokenSet,
        metrics: ServerMetrics,
        open_services: frozenset[str] = OPEN_SERVICES,
    ) -> None:
        self.tokens = tokens
        self.metrics = metrics
        self.open_services = open_services

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        service, _, _ = handler_call_details.method.lstrip("/").rpartition("/")
        if handler is None or service in self.open_services:
            return handler
        token, problem = bearer_token(handler_call_details.invocation_metadata)
        if token is not None:
            if self.tokens.accepts(token):
                return handler
            problem = "bearer token not accepted"
        return _refusing(handler, self._refusal(handler_call_details.method, problem))

    def _refusal(self, method: str, problem: str) -> Callable[..., Awaitable[None]]:
        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
            self.metrics.rejected.labels("unauthenticated").inc()
            self.metrics.requests.labels(method.rpartition("/")[2], "UNAUTHENTICATED").inc()
            log.warning("refused %s from %s: %s", method, context.peer(), problem)
            error = RequestError(grpc.StatusCode.UNAUTHENTICATED, "unauthenticated", problem)
            await context.abort(error.code, str(error), error.trailing_metadata())

        return refuse


def _refusing(
    handler: grpc.RpcMethodHandler, refuse: Callable[..., Awaitable[None]]
) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind (so a streaming method stays streaming for the
    client) that runs ``refuse`` without parsing the request."""
    serializer = handler.response_serializer
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse, None, serializer)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(refuse, None, serializer)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(refuse, None, serializer)
    return grpc.unary_unary_rpc_method_handler(refuse, None, serializer)
