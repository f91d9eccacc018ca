"""Prometheus metrics of the inference service (one registry per server, no globals).

Names use the ``chargpt_`` prefix and base units (seconds, characters); counters end in
``_total`` once exposed. The README lists each with what it measures.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from server.requests import FinishReason

# From 100 microseconds (one small decode step) to a minute (a long generation).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
# Why a request was refused before it ran (the label of chargpt_rejected_requests_total).
REJECTIONS = ("invalid", "overloaded", "no_model", "draining", "unauthenticated")


class ServerMetrics:
    """Every metric of one server, in its own registry. Known label values exist from the
    start (at 0), so rate() and alerts work before the first event of each kind."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._init_requests()
        self._init_generation()
        self._init_model()
        self._http = None

    def _counter(self, name: str, help: str, label: str = "", known: Iterable[str] = ()) -> Counter:
        labels = [label] if label else []
        counter = Counter(name, help, labels, registry=self.registry)
        for value in known:
            counter.labels(value)
        return counter

    def _histogram(
        self, name: str, help: str, buckets: tuple[float, ...], label: str = "",
        known: Iterable[str] = (),
    ) -> Histogram:  # fmt: skip
        labels = [label] if label else []
        histogram = Histogram(name, help, labels, buckets=buckets, registry=self.registry)
        for value in known:
            histogram.labels(value)
        return histogram

    def _init_requests(self) -> None:
        methods = ("Generate", "Score", "GetModelInfo")
        self.requests = Counter(
            "chargpt_requests", "RPCs finished, by method and gRPC status code.",
            ["method", "code"], registry=self.registry,
        )  # fmt: skip
        for method in methods:
            self.requests.labels(method, "OK")
        self.request_duration = self._histogram(
            "chargpt_request_duration_seconds",
            "RPC received until its last response was handed to gRPC, by method.",
            LATENCY_BUCKETS, "method", methods,
        )  # fmt: skip
        self.queue_time = self._histogram(
            "chargpt_queue_time_seconds",
            "Request received until admitted to the running batch (Generate) or started (Score).",
            LATENCY_BUCKETS, "method", ("Generate", "Score"),
        )  # fmt: skip
        self.rejected = self._counter(
            "chargpt_rejected_requests",
            f"Requests refused before running, by reason ({', '.join(REJECTIONS)}).",
            "reason", REJECTIONS,
        )  # fmt: skip
        self.running = Gauge(
            "chargpt_running_requests", "Generations in the running batch.",
            registry=self.registry,
        )  # fmt: skip
        self.waiting = Gauge(
            "chargpt_waiting_requests", "Requests admitted to the queue, not yet running.",
            registry=self.registry,
        )  # fmt: skip
        self.batch_slots_used = Gauge(
            "chargpt_batch_slot_utilization",
            "Fraction of the batch's slots (each with its KV-cache rows) in use: running "
            "generations / --max-running, 0 to 1.",
            registry=self.registry,
        )  # fmt: skip

    def _init_generation(self) -> None:
        self.time_to_first_token = self._histogram(
            "chargpt_time_to_first_token_seconds",
            "Generate received until its first character was sampled.", LATENCY_BUCKETS,
        )  # fmt: skip
        self.inter_token_latency = self._histogram(
            "chargpt_inter_token_latency_seconds",
            "Time between consecutive characters sampled for one Generate.", LATENCY_BUCKETS,
        )  # fmt: skip
        self.step_duration = self._histogram(
            "chargpt_decode_step_seconds",
            "One engine iteration that decoded (with its share of prompts and Score).",
            LATENCY_BUCKETS,
        )  # fmt: skip
        self.batch_size = self._histogram(
            "chargpt_batch_size", "Generations decoded together in one step.", BATCH_BUCKETS
        )
        self.positions = self._counter(
            "chargpt_computed_positions",
            "Positions the model computed, by work: decode (one per character, from the KV "
            "cache), window (a whole block recomputed per character), prompt, score.",
            "work", ("decode", "window", "prompt", "score"),
        )  # fmt: skip
        self.generated_characters = self._counter(
            "chargpt_generated_characters", "Characters generated (sampled)."
        )
        self.prompt_characters = self._counter(
            "chargpt_prompt_characters", "Prompt characters of admitted Generate requests."
        )
        self.scored_characters = self._counter(
            "chargpt_scored_characters", "Characters scored by Score."
        )
        self.finished = self._counter(
            "chargpt_finished_generations",
            f"Generations ended, by reason ({', '.join(FinishReason)}).",
            "reason", [reason.value for reason in FinishReason],
        )  # fmt: skip

    def _init_model(self) -> None:
        self.model_info = Info(
            "chargpt_model", "The checkpoint being served.", registry=self.registry
        )
        self.model_loaded = Gauge(
            "chargpt_model_loaded", "1 when a model is loaded and serving, else 0.",
            registry=self.registry,
        )  # fmt: skip
        self.model_step = Gauge(
            "chargpt_model_step", "Training step of the served checkpoint.",
            registry=self.registry,
        )  # fmt: skip
        self.reloads = self._counter(
            "chargpt_model_reloads", "Checkpoint load attempts, by outcome (loaded, refused).",
            "outcome", ("loaded", "refused"),
        )  # fmt: skip
        self.token_reloads = self._counter(
            "chargpt_token_file_reloads",
            "New versions of the --auth-token-file, by outcome (loaded, refused).",
            "outcome", ("loaded", "refused"),
        )  # fmt: skip

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics over HTTP; returns the bound port (useful with port 0)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
