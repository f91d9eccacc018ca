"""Prometheus metrics of a running training job (rank 0 only)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Info, start_http_server


class TrainerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.step = Gauge("chargpt_trainer_step", "Optimizer steps completed.", registry=r)
        self.max_steps = Gauge("chargpt_trainer_max_steps", "Steps the run will take.", registry=r)
        self.tokens = Counter(
            "chargpt_trainer_tokens", "Training tokens processed, all ranks.", registry=r
        )
        self.batch_loss = Gauge(
            "chargpt_trainer_batch_loss", "Loss of the latest training batch (nats).", registry=r
        )
        self.learning_rate = Gauge(
            "chargpt_trainer_learning_rate", "Current learning rate.", registry=r
        )
        self.loss = Gauge(
            "chargpt_trainer_loss",
            "Loss at the latest evaluation (nats/char), by split.",
            ["split"],
            registry=r,
        )
        self.best_val_loss = Gauge(
            "chargpt_trainer_best_val_loss", "Best validation loss so far (nats/char).", registry=r
        )
        self.checkpoints = Counter(
            "chargpt_trainer_checkpoints",
            "Checkpoint files published, by kind (best, latest).",
            ["kind"],
            registry=r,
        )
        for kind in ("best", "latest"):
            self.checkpoints.labels(kind)
        self.run = Info("chargpt_trainer_run", "The run being trained.", registry=r)
        self._server = None

    def serve(self, port: int) -> None:
        self._server, _ = start_http_server(port, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
