"""A tiny DNS server on loopback for the replica tests: one name, the A records it answers
changed while it runs, as a Kubernetes headless Service's are when pods come and go.

gRPC's ``dns://127.0.0.1:PORT/NAME:PORT`` target (its c-ares resolver, asking this server)
and Envoy's ``STRICT_DNS`` cluster (with this server as its resolver) both resolve through
it, so the tests exercise the real resolvers without touching the machine's own DNS.
"""

from __future__ import annotations

import socket
import struct
import threading
from types import TracebackType

A, IN = 1, 1
NOERROR, NXDOMAIN = 0, 3


def parse_question(packet: bytes) -> tuple[str, int, int]:
    """(name, type, end offset of the question) of the query's first question."""
    labels, offset = [], 12
    while length := packet[offset]:
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii").lower())
        offset += 1 + length
    qtype, _qclass = struct.unpack_from("!HH", packet, offset + 1)
    return ".".join(labels), qtype, offset + 5


class DNSServer:
    """``with DNSServer("replicas.test") as dns: dns.addresses = ["127.0.0.2"]``: answers
    A queries for the name with ``addresses`` (TTL 0), any other type for it with no
    records, and any other name with NXDOMAIN."""

    def __init__(self, name: str) -> None:
        self.name = name.lower().rstrip(".")
        self.addresses: list[str] = []
        self.queries = 0  # A queries for the name answered so far
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = int(self._socket.getsockname()[1])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="dns", daemon=True)

    def answer(self, query: bytes) -> bytes:
        (ident,) = struct.unpack_from("!H", query)
        name, qtype, end = parse_question(query)
        records: list[str] = []
        code = NOERROR
        if name != self.name:
            code = NXDOMAIN
        elif qtype == A:
            records = list(self.addresses)
            self.queries += 1
        flags = 0x8400 | code  # a response, authoritative, no recursion
        header = struct.pack("!HHHHHH", ident, flags, 1, len(records), 0, 0)
        answers = b"".join(
            struct.pack("!HHHIH", 0xC00C, A, IN, 0, 4) + socket.inet_aton(address)
            for address in records
        )
        return header + query[12:end] + answers

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                query, peer = self._socket.recvfrom(512)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._socket.sendto(self.answer(query), peer)
            except (IndexError, struct.error, UnicodeDecodeError):
                continue  # not a query this server understands: no answer

    def __enter__(self) -> DNSServer:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()
