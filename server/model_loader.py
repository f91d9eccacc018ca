"""Loading the served checkpoint, and watching it for new versions (hot reload).

A candidate is loaded in the background, verified (integrity digest, architecture, a real
forward pass with finite logits) and only then handed to the engine. A file that fails
is refused with a log line and a metric; whatever was serving keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from chargpt.checkpoint import CheckpointError, load_checkpoint
from server.decoder import Decoder
from server.metrics import ServerMetrics
from server.served import ServedModel
from server.watch import FileSignature, Poller, file_signature

log = logging.getLogger(__name__)


def load_served_model(
    path: Path, device: torch.device, dtype: torch.dtype, cache_slots: int, compile: bool = False
) -> ServedModel:
    """Load and verify a checkpoint; raises CheckpointError if it cannot be served.
    ``compile``: build the compiled decode step now (``server/compiled.py``), so that
    the model is published only once it is ready."""
    loaded = load_checkpoint(path, device, dtype)
    try:
        with torch.inference_mode():
            logits, _ = loaded.model(torch.zeros((1, 1), dtype=torch.long, device=device))
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: test forward pass failed: {exc}") from exc
    if logits.shape != (1, 1, loaded.info.config.vocab_size) or not torch.isfinite(logits).all():
        raise CheckpointError(f"{path}: test forward pass gave non-finite logits")
    decoder = Decoder(loaded.model, cache_slots, compile)
    return ServedModel(loaded, str(path), device, dtype, time.time(), decoder)


class ModelWatcher:
    """Polls the checkpoint path and publishes each new verified model via ``on_model``."""

    def __init__(
        self,
        path: Path,
        device: torch.device,
        dtype: torch.dtype,
        cache_slots: int,
        metrics: ServerMetrics,
        on_model: Callable[[ServedModel], None],
        poll_seconds: float = 1.0,
        compile: bool = False,
    ) -> None:
        self.path = path
        self.device = device
        self.dtype = dtype
        self.cache_slots = cache_slots
        self.metrics = metrics
        self.on_model = on_model
        self.compile = compile
        self._seen: FileSignature | None = None
        self._poller = Poller("model-watcher", self.check_once, poll_seconds)

    def check_once(self) -> bool:
        """Load the file if it changed since the last attempt; True if a model was published."""
        signature = file_signature(self.path)
        if signature is None or signature == self._seen:
            return False
        self._seen = signature
        try:
            served = load_served_model(
                self.path, self.device, self.dtype, self.cache_slots, self.compile
            )
        except CheckpointError as exc:
            self.metrics.reloads.labels("refused").inc()
            log.error("refused checkpoint %s: %s", self.path, exc)
            return False
        except Exception:  # e.g. out of device memory: refuse, keep serving
            self.metrics.reloads.labels("refused").inc()
            log.exception("refused checkpoint %s: unexpected error while loading", self.path)
            return False
        self.metrics.reloads.labels("loaded").inc()
        info = served.loaded.info
        log.info(
            "loaded %s: step %d, val loss %s, sha256 %s, on %s (%s)",
            self.path, info.step, info.val_loss, served.loaded.file_sha256[:12],
            served.device, str(served.dtype).removeprefix("torch."),
        )  # fmt: skip
        self.on_model(served)
        return True

    def start(self) -> None:
        self._poller.start()

    def stop(self) -> None:
        self._poller.stop()
