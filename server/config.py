"""Everything ``chargpt serve`` can be told, each setting declared once (its default, help
and range become the command's option: ``chargpt.settings``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import click

from chargpt.settings import REQUIRED, check_settings, setting

UTF8_MAX_BYTES = 4
DTYPES = ("float32", "bfloat16", "float16")
MAX_CONNECTION_SECONDS = 2_000_000  # about 23 days: gRPC takes milliseconds in a C int


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (checked by ``server/validation.py``)."""

    max_prompt_chars: int = setting(4096, "Longest prompt accepted.", minimum=1)
    max_new_tokens: int = setting(2048, "Largest max_new_tokens a request may ask for.", minimum=1)
    default_max_new_tokens: int = setting(
        256, "max_new_tokens of a request that leaves it unset.", minimum=1
    )
    max_stop_sequences: int = setting(8, "Most stop sequences per request.", minimum=0)
    max_stop_chars: int = setting(64, "Longest stop sequence.", minimum=1)
    max_score_chars: int = setting(
        65536, "Longest context + text a Score request may send.", minimum=1
    )
    stream_interval: int = setting(
        1,
        "Characters per streamed message of a Generate request that leaves "
        "characters_per_message unset (SGLang's name). 1: every character as soon as it is "
        "sampled; larger values send fewer, bigger messages, which costs each stream that "
        "much latency and saves per-message work under load. A slow reader's backlog is "
        "always coalesced, whatever this says (docs/serving-speed.md).",
        minimum=1,
        maximum=1024,
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.default_max_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"default_max_new_tokens ({self.default_max_new_tokens}) exceeds "
                f"max_new_tokens ({self.max_new_tokens})"
            )

    def largest_request_bytes(self) -> int:
        """The most bytes a request within these limits can take on the wire (a bound)."""
        generate = self.max_prompt_chars + self.max_stop_sequences * self.max_stop_chars
        return UTF8_MAX_BYTES * max(generate, self.max_score_chars) + 4096


@dataclass(frozen=True)
class ServerConfig:
    checkpoint: str = setting(
        REQUIRED,
        "The model.safetensors to serve. It may not exist yet: the server starts "
        "NOT_SERVING and loads it when it appears, and reloads it whenever it changes.",
        type=click.Path(dir_okay=False),
    )
    host: str = setting(
        "127.0.0.1",
        "Address gRPC listens on: 127.0.0.1 is this machine only, 0.0.0.0 every interface "
        "(the container's setting).",
    )
    port: int = setting(50051, "gRPC port.", minimum=1, maximum=65535)
    metrics_port: int = setting(
        9100, "Prometheus /metrics port (0 = off).", minimum=0, maximum=65535
    )
    metrics_host: str | None = setting(
        None, "Address /metrics (plain HTTP, no authentication) listens on (default: --host)."
    )
    tls_cert: str | None = setting(
        None,
        "PEM certificate (chain) to serve gRPC over TLS with; needs --tls-key.",
        type=click.Path(dir_okay=False),
    )
    tls_key: str | None = setting(
        None, "PEM private key of --tls-cert (unencrypted).", type=click.Path(dir_okay=False)
    )
    tls_client_ca: str | None = setting(
        None,
        "PEM CA certificate(s): require client certificates signed by them (mutual TLS).",
        type=click.Path(dir_okay=False),
    )
    auth_token_file: str | None = setting(
        None,
        "File of bearer tokens, one per line ('#' comments): every call but grpc.health.v1 "
        "must send 'authorization: Bearer <token>'. Re-read when it changes.",
        type=click.Path(dir_okay=False),
    )
    device: str = setting("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.")
    dtype: str = setting(
        "float32", "Weights and activations dtype; float16 needs a GPU.", choices=DTYPES
    )
    compile: bool = setting(
        True,
        "Compile the decode step (AOTInductor, one graph per batch size 1, 4, 16, ... up "
        "to --max-running) when a model loads, before it serves; serves eager, with a "
        "log line, where there is no C++ compiler.",
        negatable=True,
    )
    max_running: int = setting(
        64, "Generations decoded together (the batch cap); more wait in the queue.", minimum=1
    )
    max_waiting: int = setting(
        256, "Requests allowed to wait; beyond that, RESOURCE_EXHAUSTED at once.", minimum=1
    )
    max_message_bytes: int = setting(
        0,
        "Largest request message read (0 = derived: 4x the largest valid request, at "
        "least 16 MiB); larger ones get gRPC's own RESOURCE_EXHAUSTED.",
        minimum=0,
    )
    reload_seconds: float = setting(
        1.0,
        "How often to check the checkpoint (and the token file) for a new version.",
        minimum=0.05,
    )
    drain_seconds: float = setting(
        10.0, "On SIGTERM: how long in-flight requests may take to finish.", minimum=0
    )
    drain_delay: float = setting(
        0.0,
        "On SIGTERM: report NOT_SERVING but keep serving new calls for this many seconds "
        "first, so that load balancers, endpoints and health-checking clients stop "
        "sending; then drain (--drain-seconds).",
        minimum=0,
    )
    max_connection_age: float = setting(
        0.0,
        "Close each client connection (gracefully, by GOAWAY) after about this many "
        "seconds, so long-lived clients re-resolve the server's name and find new "
        "replicas (0 = never).",
        minimum=0,
        maximum=MAX_CONNECTION_SECONDS,
    )
    max_connection_age_grace: float = setting(
        0.0,
        "How long calls in flight on a connection closed by --max-connection-age may "
        "still run (0 = until they finish).",
        minimum=0,
        maximum=MAX_CONNECTION_SECONDS,
    )
    log_level: str = setting(
        "info", "Log verbosity (to stderr).", choices=("debug", "info", "warning", "error")
    )
    limits: Limits = field(default_factory=Limits)

    def __post_init__(self) -> None:
        check_settings(self)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: give both or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError(
                "tls_client_ca needs tls_cert and tls_key: mutual TLS is TLS that also "
                "asks clients for certificates"
            )

    @property
    def metrics_bind(self) -> str:
        return self.host if self.metrics_host is None else self.metrics_host

    def receive_limit(self) -> int:
        """The largest request message gRPC will read: four times the largest valid
        request and at least 16 MiB, so that a request too long by any plausible margin is
        still read and refused with INVALID_ARGUMENT naming its field; beyond it, gRPC
        itself answers RESOURCE_EXHAUSTED without reading further."""
        derived = max(16 * 1024 * 1024, 4 * self.limits.largest_request_bytes())
        return self.max_message_bytes or derived
