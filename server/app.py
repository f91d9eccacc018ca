"""Wiring the inference server together: gRPC (service, health, reflection), the
engine, the model watcher and the metrics endpoint; and its graceful shutdown.

Threads: the engine loop runs on the main thread (libgomp re-creates its worker threads
for every parallel region entered from another thread, which made small decode steps 4x
slower); gRPC runs on one asyncio event loop in a thread of its own; the model watcher
polls in another.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chargpt.runtime import configure_cpu_threads, keep_freed_memory_mapped, resolve_device
from server.auth import TokenAuthInterceptor, TokenFile
from server.config import ServerConfig
from server.engine import Engine, deliver_directly
from server.metrics import ServerMetrics
from server.model_loader import ModelWatcher
from server.requests import Event, Generation
from server.served import ServedModel
from server.service import SERVICE_NAME, LanguageModelService
from server.tls import ServerTLS, load_server_tls

log = logging.getLogger(__name__)
# A grpc.health.v1 service name that answers SERVING for as long as the process serves
# gRPC at all, loaded model or not: for liveness probes, which must not restart a server
# that is waiting for its first checkpoint or draining ("" and the LanguageModel service
# say whether it takes requests: readiness).
LIVENESS = "liveness"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
T = TypeVar("T")


def resolve_dtype(device: torch.device, name: str) -> torch.dtype:
    """The dtype to serve in, refusing combinations the device cannot run."""
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("dtype float16 needs a GPU; use float32 or bfloat16 on CPU")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}")
    return dtype


def is_loopback(host: str) -> bool:
    """Whether ``host`` only reaches this machine (a host name other than localhost might
    resolve anywhere, so it does not count)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, tls: bool, tokens: bool) -> str | None:
    """What is unsafe about listening on ``host`` like this, if anything."""
    if tls or is_loopback(host):
        return None
    if not tokens:
        return (
            f"gRPC listens on {host} with neither TLS nor tokens: anyone who can reach the "
            "port may call the server, in clear text. Give --tls-cert/--tls-key and "
            "--auth-token-file, or --host 127.0.0.1 (in a container: publish the port on "
            "127.0.0.1 only, as docker-compose.yml does)"
        )
    return (
        f"gRPC listens on {host} without TLS: bearer tokens cross the network in clear "
        "text. Give --tls-cert/--tls-key (or terminate TLS in front of the server)"
    )


class InferenceServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(self.device, config.dtype)
        self.metrics = ServerMetrics()
        self.tls: ServerTLS | None = None
        if config.tls_cert is not None and config.tls_key is not None:
            self.tls = load_server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
        self.tokens: TokenFile | None = None
        if config.auth_token_file is not None:
            self.tokens = TokenFile(
                Path(config.auth_token_file), self.metrics, config.reload_seconds
            )
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self.loop.run_forever, name="grpc", daemon=True)
        self.engine = Engine(
            self.metrics, config.max_running, config.max_waiting, deliver=self._deliver
        )
        self.service = LanguageModelService(self.engine, self.metrics, config.limits)
        self.health = health.aio.HealthServicer()
        self.watcher = ModelWatcher(
            Path(config.checkpoint), self.device, self.dtype, config.max_running, self.metrics,
            self._on_model, config.reload_seconds, config.compile,
        )  # fmt: skip
        self.grpc_server: grpc.aio.Server | None = None
        self.stopping = False  # SIGTERM came: health stays NOT_SERVING whatever loads
        self.port = 0
        self.metrics_port = 0

    def _describe_security(self) -> str:
        tls = self.tls.describe() if self.tls is not None else "plaintext"
        if self.tokens is None:
            return f"{tls}, no token needed"
        return f"{tls}, accepting {self.tokens.tokens} from {self.tokens.path}"

    def _deliver(self, batch: list[tuple[Generation, Event]]) -> None:
        """Engine thread -> event loop: one wake-up per decode step."""
        self.loop.call_soon_threadsafe(deliver_directly, batch)

    def _on_loop(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    def _on_model(self, served: ServedModel) -> None:
        self.service.set_model(served)
        if not self.stopping:
            self._on_loop(self._set_health(health_pb2.HealthCheckResponse.SERVING))

    async def _start_grpc(self) -> int:
        # Streams wait on the engine, not on threads, so the limit is just a backstop
        # above the engine's own admission control.
        limit = self.config.max_running + self.config.max_waiting + 64
        options = [("grpc.max_receive_message_length", self.config.receive_limit())]
        if self.config.max_connection_age:
            options.append(("grpc.max_connection_age_ms", ms(self.config.max_connection_age)))
            if self.config.max_connection_age_grace:
                grace = ms(self.config.max_connection_age_grace)
                options.append(("grpc.max_connection_age_grace_ms", grace))
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if self.tokens is not None:
            interceptors.append(TokenAuthInterceptor(self.tokens, self.metrics))
        server = grpc.aio.server(
            interceptors=interceptors, maximum_concurrent_rpcs=limit, options=options
        )
        server.add_generic_rpc_handlers((self.service.handler(),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        address = f"{self.config.host}:{self.config.port}"
        if self.tls is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, self.tls.credentials())
        await server.start()
        self.grpc_server = server
        return port

    def start(self) -> None:
        """Start listening and watching the checkpoint; the caller then runs
        ``engine.run()`` on the main thread."""
        keep_freed_memory_mapped()
        if self.device.type == "cpu":
            configure_cpu_threads()
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve(
                self.config.metrics_port, self.config.metrics_bind
            )
        self._loop_thread.start()
        try:
            self.port = self._on_loop(self._start_grpc())
        except RuntimeError as exc:  # grpc raises RuntimeError when it cannot bind
            raise OSError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc}"
            ) from None
        log.info(
            "listening: grpc %s:%d (%s), metrics %s; device %s, dtype %s",
            self.config.host, self.port, self._describe_security(),
            f"{self.config.metrics_bind}:{self.metrics_port}" if self.metrics_port else "off",
            self.device, str(self.dtype).removeprefix("torch."),
        )  # fmt: skip
        warning = exposure_warning(self.config.host, self.tls is not None, self.tokens is not None)
        if warning:
            log.warning("%s", warning)
        if self.tokens is not None:
            self.tokens.start()
        if not self.watcher.check_once() and self.service.model is None:
            log.warning("no servable checkpoint at %s yet; NOT_SERVING until one appears",
                        self.config.checkpoint)  # fmt: skip
        self.watcher.start()

    def drain(self) -> None:
        """NOT_SERVING; keep serving new calls for ``drain_delay`` seconds while load
        balancers and clients take this replica out; then refuse new calls, give
        in-flight ones the grace period, and stop the engine (which ends whatever is
        left)."""
        self.stopping = True
        self._on_loop(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        if self.config.drain_delay:
            log.info("NOT_SERVING; still taking new calls for %.1fs (--drain-delay)",
                     self.config.drain_delay)  # fmt: skip
            time.sleep(self.config.drain_delay)
        self.service.draining = True
        deadline = time.monotonic() + self.config.drain_seconds
        running, waiting = self.engine.load()
        log.info("draining: %d running, %d waiting, up to %.1fs", running, waiting,
                 self.config.drain_seconds)  # fmt: skip
        while (running or waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
            running, waiting = self.engine.load()
        if running or waiting:
            log.warning("grace period over: ending %d running, %d waiting", running, waiting)
        self.watcher.stop()
        if self.tokens is not None:
            self.tokens.stop()
        self.engine.request_stop()

    def close(self) -> None:
        """After the engine has stopped: close the gRPC server and the metrics endpoint."""
        if self.grpc_server is not None:
            self._on_loop(self.grpc_server.stop(grace=1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._loop_thread.join(timeout=10)
        self.metrics.close()
        log.info("stopped")


def ms(seconds: float) -> int:
    """Seconds as the whole milliseconds gRPC's channel arguments take (at least 1)."""
    return max(1, round(seconds * 1000))


def run_until_signalled(server: InferenceServer, stop: threading.Event) -> None:
    """Serve with the engine on this (main) thread until ``stop`` is set, then drain."""
    server.start()
    threading.Thread(
        target=lambda: (stop.wait(), server.drain()), name="drain", daemon=True
    ).start()
    server.engine.run()
    server.close()
