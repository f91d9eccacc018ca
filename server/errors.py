"""Errors that a transport maps to a status: kept apart from the service, so that code
which only raises them (the auth interceptor) does not import the whole service."""

from __future__ import annotations

import grpc

from server.validation import bounded


class RequestError(Exception):
    """End the call with ``code``. ``reason`` (one word) travels in the ``chargpt-reason``
    trailing metadata, and ``field`` (for invalid requests) in ``chargpt-field``, so that
    clients can tell errors apart without reading the message, which is bounded."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str, field: str = "") -> None:
        super().__init__(bounded(message))
        self.code, self.reason, self.field = code, reason, field

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        extra = (("chargpt-field", self.field),) if self.field else ()
        return (("chargpt-reason", self.reason), *extra)
