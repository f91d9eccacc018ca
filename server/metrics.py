"""Prometheus metrics of the inference service (one registry per server, no globals).

Names use the ``chargpt_`` prefix and base units (seconds, characters); counters end in
``_total`` once exposed. The README lists each with what it measures.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

# From 100 microseconds (one small decode step) to a minute (a long generation).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075,
    0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)
# Why a request was refused before it ran (the label of chargpt_rejected_requests_total).
REJECTIONS = ("invalid", "overloaded", "no_model", "draining", "unauthenticated")


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "chargpt_requests", "RPCs finished, by method and gRPC status code.",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.request_duration = Histogram(
            "chargpt_request_duration_seconds",
            "RPC received until its last response was handed to gRPC, by method.",
            ["method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.time_to_first_token = Histogram(
            "chargpt_time_to_first_token_seconds",
            "Generate received until its first character was sampled.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token_latency = Histogram(
            "chargpt_inter_token_latency_seconds",
            "Time between consecutive characters sampled for one Generate.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.queue_time = Histogram(
            "chargpt_queue_time_seconds",
            "Request received until admitted to the running batch (Generate) or started (Score).",
            ["method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.step_duration = Histogram(
            "chargpt_decode_step_seconds", "Duration of one batched decode step.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "chargpt_batch_size", "Generations decoded together in one step.",
            buckets=BATCH_BUCKETS, registry=r,
        )  # fmt: skip
        self.positions = Counter(
            "chargpt_computed_positions",
            "Positions the model computed, by work: decode (one per character, from the KV "
            "cache), window (a whole block recomputed per character), prompt, score.",
            ["work"], registry=r,
        )  # fmt: skip
        self.generated_characters = Counter(
            "chargpt_generated_characters", "Characters generated (sampled).", registry=r
        )
        self.prompt_characters = Counter(
            "chargpt_prompt_characters", "Prompt characters of admitted Generate requests.",
            registry=r,
        )  # fmt: skip
        self.scored_characters = Counter(
            "chargpt_scored_characters", "Characters scored by Score.", registry=r
        )
        self.running = Gauge(
            "chargpt_running_requests", "Generations in the running batch.", registry=r
        )
        self.waiting = Gauge(
            "chargpt_waiting_requests", "Requests admitted to the queue, not yet running.",
            registry=r,
        )  # fmt: skip
        self.finished = Counter(
            "chargpt_finished_generations",
            "Generations ended, by reason (length, stop, time_limit, cancelled, shutdown, error).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "chargpt_rejected_requests",
            "Requests refused before running, by reason (overloaded, invalid, no_model, "
            "draining, unauthenticated).",
            ["reason"], registry=r,
        )  # fmt: skip
        self.model_info = Info("chargpt_model", "The checkpoint being served.", registry=r)
        self.model_loaded = Gauge(
            "chargpt_model_loaded", "1 when a model is loaded and serving, else 0.", registry=r
        )
        self.model_step = Gauge(
            "chargpt_model_step", "Training step of the served checkpoint.", registry=r
        )
        self.reloads = Counter(
            "chargpt_model_reloads",
            "Checkpoint load attempts, by outcome (loaded, refused).",
            ["outcome"], registry=r,
        )  # fmt: skip
        self.token_reloads = Counter(
            "chargpt_token_file_reloads",
            "New versions of the --auth-token-file, by outcome (loaded, refused).",
            ["outcome"], registry=r,
        )  # fmt: skip
        # Known label values exist from the start (at 0), so rate() and alerts work before
        # the first event of each kind.
        for method in ("Generate", "Score", "GetModelInfo"):
            self.requests.labels(method, "OK")
            self.request_duration.labels(method)
        for method in ("Generate", "Score"):
            self.queue_time.labels(method)
        for reason in ("length", "stop", "time_limit", "cancelled", "shutdown", "error"):
            self.finished.labels(reason)
        for reason in REJECTIONS:
            self.rejected.labels(reason)
        for work in ("decode", "window", "prompt", "score"):
            self.positions.labels(work)
        for outcome in ("loaded", "refused"):
            self.reloads.labels(outcome)
            self.token_reloads.labels(outcome)
        self._http = None

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Expose /metrics over HTTP; returns the bound port (useful with port 0)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return int(self._http.server_address[1])

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
