"""Wiring the inference server together: gRPC (service, health, reflection), the
engine, the model watcher and the metrics endpoint; and its graceful shutdown."""

from __future__ import annotations

import logging
import threading
import time
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from chargpt.runtime import configure_cpu_threads, keep_freed_memory_mapped, resolve_device
from chargpt.v1 import language_model_pb2 as pb
from chargpt.v1 import language_model_pb2_grpc as pb_grpc
from server.engine import Engine, ServedModel
from server.metrics import ServerMetrics
from server.model_loader import ModelWatcher
from server.service import LanguageModelService, Limits

log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["LanguageModel"].full_name
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ServerConfig:
    checkpoint: Path
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9100
    device: str = "auto"
    dtype: str = "float32"
    max_running: int = 32
    max_waiting: int = 256
    limits: Limits = field(default_factory=Limits)
    reload_seconds: float = 1.0
    drain_seconds: float = 10.0


def resolve_dtype(device: torch.device, name: str) -> torch.dtype:
    """The dtype to serve in, refusing combinations the device cannot run."""
    dtype = DTYPES[name]
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("dtype float16 needs a GPU; use float32 or bfloat16 on CPU")
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(f"dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}")
    return dtype


class InferenceServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(self.device, config.dtype)
        self.metrics = ServerMetrics()
        self.engine = Engine(self.metrics, config.max_running, config.max_waiting)
        self.service = LanguageModelService(self.engine, self.metrics, config.limits)
        self.health = health.HealthServicer(experimental_non_blocking=True)
        self.watcher = ModelWatcher(
            config.checkpoint, self.device, self.dtype, config.max_running, self.metrics,
            self._on_model, config.reload_seconds,
        )  # fmt: skip
        # One thread per in-flight RPC (streams block on their event queue) plus spare
        # threads so health checks and refusals are answered while every slot is busy.
        workers = config.max_running + config.max_waiting + 16
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rpc"),
            maximum_concurrent_rpcs=workers,
        )
        pb_grpc.add_LanguageModelServicer_to_server(self.service, self.grpc_server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server
        )
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = 0
        self.metrics_port = 0

    def _set_health(self, status: int) -> None:
        for name in ("", SERVICE_NAME):
            self.health.set(name, status)

    def _on_model(self, served: ServedModel) -> None:
        self.service.set_model(served)
        if not self.service.draining:
            self._set_health(health_pb2.HealthCheckResponse.SERVING)

    def start(self) -> None:
        """Start listening and watching the checkpoint; the caller then runs
        ``engine.run()`` (on the main thread) or ``engine.start()``."""
        keep_freed_memory_mapped()
        if self.device.type == "cpu":
            configure_cpu_threads()
        if self.config.metrics_port:
            self.metrics_port = self.metrics.serve(self.config.metrics_port, self.config.host)
        self.port = self.grpc_server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        if not self.port:
            raise OSError(f"cannot listen on {self.config.host}:{self.config.port}")
        self.grpc_server.start()
        log.info(
            "listening: grpc %s:%d, metrics %s; device %s, dtype %s",
            self.config.host, self.port,
            f"{self.config.host}:{self.metrics_port}" if self.metrics_port else "off",
            self.device, str(self.dtype).removeprefix("torch."),
        )  # fmt: skip
        if not self.watcher.check_once() and self.service.model is None:
            log.warning("no servable checkpoint at %s yet; NOT_SERVING until one appears",
                        self.config.checkpoint)  # fmt: skip
        self.watcher.start()

    def drain(self) -> None:
        """NOT_SERVING, refuse new calls, give in-flight ones the grace period, then stop
        the engine (which ends whatever is left)."""
        self.service.draining = True
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
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
        self.engine.request_stop()

    def close(self) -> None:
        """After the engine has stopped: close the gRPC server and the metrics endpoint."""
        self.grpc_server.stop(grace=1.0).wait()
        self.metrics.close()
        log.info("stopped")


def run_until_signalled(server: InferenceServer, stop: threading.Event) -> None:
    """Serve with the engine on this (main) thread until ``stop`` is set, then drain."""
    server.start()
    threading.Thread(
        target=lambda: (stop.wait(), server.drain()), name="drain", daemon=True
    ).start()
    server.engine.run()
    server.close()
