"""``chargpt serve``: the options are ``ServerConfig``'s and ``Limits``' fields
(``server/config.py``)."""

from __future__ import annotations

import logging
import signal
import threading
import warnings

import click

from chargpt.settings import InputError, LayeredCommand, build, config_option, options
from server.app import InferenceServer, run_until_signalled
from server.config import Limits, ServerConfig


@click.command(cls=LayeredCommand)
@options(ServerConfig, Limits)
@config_option()
def serve(config: str | None, **settings: object) -> int:
    """Serve a checkpoint over gRPC (chargpt.v1.LanguageModel, grpc.health.v1, reflection)
    with Prometheus metrics. SIGTERM or Ctrl-C drains and exits 0."""
    server_config = build(ServerConfig, settings, limits=build(Limits, settings))
    logging.basicConfig(
        level=server_config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # torch 2.13's own pickling of exported graphs warns of its own deprecated API, once
    # per graph compiled: noise in the server's log that no setting of ours can fix.
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
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
