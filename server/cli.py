"""``chargpt serve``."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

import click

from chargpt.settings import InputError, LayeredCommand, config_option, option
from server.app import DTYPES, InferenceServer, ServerConfig, run_until_signalled
from server.validation import Limits

LIMITS = Limits()
POSITIVE = click.IntRange(min=1)


@click.command(cls=LayeredCommand)
@option(
    "--checkpoint",
    required=True,
    type=click.Path(dir_okay=False),
    help="The model.safetensors to serve. It may not exist yet: the server starts "
    "NOT_SERVING and loads it when it appears, and reloads it whenever it changes.",
)
@option("--host", default="0.0.0.0", help="Address to listen on (gRPC and metrics).")
@option("--port", type=click.IntRange(1, 65535), default=50051, help="gRPC port.")
@option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    default=9100,
    help="Prometheus /metrics port (0 = off).",
)
@option(
    "--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps."
)
@option(
    "--dtype",
    type=click.Choice(sorted(DTYPES)),
    default="float32",
    help="Weights and activations dtype; float16 needs a GPU.",
)
@option(
    "--max-running",
    type=POSITIVE,
    default=64,
    help="Generations decoded together (the batch cap); more wait in the queue.",
)
@option(
    "--max-waiting",
    type=POSITIVE,
    default=256,
    help="Requests allowed to wait; beyond that, RESOURCE_EXHAUSTED at once.",
)
@option(
    "--max-prompt-chars",
    type=POSITIVE,
    default=LIMITS.max_prompt_chars,
    help="Longest prompt accepted.",
)
@option(
    "--max-new-tokens",
    type=POSITIVE,
    default=LIMITS.max_new_tokens,
    help="Largest max_new_tokens a request may ask for.",
)
@option(
    "--default-max-new-tokens",
    type=POSITIVE,
    default=LIMITS.default_max_new_tokens,
    help="max_new_tokens of a request that leaves it unset.",
)
@option(
    "--max-stop-sequences",
    type=click.IntRange(min=0),
    default=LIMITS.max_stop_sequences,
    help="Most stop sequences per request.",
)
@option(
    "--max-stop-chars", type=POSITIVE, default=LIMITS.max_stop_chars, help="Longest stop sequence."
)
@option(
    "--max-score-chars",
    type=POSITIVE,
    default=LIMITS.max_score_chars,
    help="Longest context + text a Score request may send.",
)
@option(
    "--max-message-bytes",
    type=click.IntRange(min=0),
    default=0,
    help="Largest request message read (0 = derived: 4x the largest valid request, at "
    "least 16 MiB); larger ones get gRPC's own RESOURCE_EXHAUSTED.",
)
@option(
    "--reload-seconds",
    type=click.FloatRange(min=0.05),
    default=1.0,
    help="How often to check the checkpoint file for a new version.",
)
@option(
    "--drain-seconds",
    type=click.FloatRange(min=0),
    default=10.0,
    help="On SIGTERM: how long in-flight requests may take to finish.",
)
@option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    help="Log verbosity (to stderr).",
)
@config_option()
def serve(
    config: str | None,
    checkpoint: str,
    host: str,
    port: int,
    metrics_port: int,
    device: str,
    dtype: str,
    max_running: int,
    max_waiting: int,
    max_prompt_chars: int,
    max_new_tokens: int,
    default_max_new_tokens: int,
    max_stop_sequences: int,
    max_stop_chars: int,
    max_score_chars: int,
    max_message_bytes: int,
    reload_seconds: float,
    drain_seconds: float,
    log_level: str,
) -> int:
    """Serve a checkpoint over gRPC (chargpt.v1.LanguageModel, grpc.health.v1, reflection)
    with Prometheus metrics. SIGTERM or Ctrl-C drains and exits 0."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if default_max_new_tokens > max_new_tokens:
        raise InputError(
            f"--default-max-new-tokens ({default_max_new_tokens}) exceeds --max-new-tokens "
            f"({max_new_tokens})"
        )
    limits = Limits(
        max_prompt_chars=max_prompt_chars,
        max_new_tokens=max_new_tokens,
        default_max_new_tokens=default_max_new_tokens,
        max_stop_sequences=max_stop_sequences,
        max_stop_chars=max_stop_chars,
        max_score_chars=max_score_chars,
    )
    server_config = ServerConfig(
        checkpoint=Path(checkpoint), host=host, port=port, metrics_port=metrics_port,
        device=device, dtype=dtype, max_running=max_running, max_waiting=max_waiting,
        limits=limits, reload_seconds=reload_seconds, drain_seconds=drain_seconds,
        max_message_bytes=max_message_bytes,
    )  # fmt: skip
    try:
        server = InferenceServer(server_config)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        run_until_signalled(server, stop)
    except OSError as exc:
        raise InputError(str(exc)) from None
    return 0
