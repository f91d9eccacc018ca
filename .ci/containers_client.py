"""Streams that run across an event on the containerised server, for .ci/containers.

    python .ci/containers_client.py across-reload --server 127.0.0.1:50051
    python .ci/containers_client.py across-drain --server 127.0.0.1:50051

Greedy streams run back to back on a few workers, each with its own length so that their
ends drift apart, so one is always in flight. The first
line on stdout is ``ready`` once a stream is running: the caller then causes the event (it
publishes a new checkpoint, or stops the container). The last line is a JSON report, and
the exit status is 0 only if the event was seen while a stream ran and every stream that
had started finished whole.

- ``across-reload``: waits until GetModelInfo names other weights. A stream submitted
  before the new weights were loaded and still running once they serve must finish on
  the old weights with the old model's text.
- ``across-drain``: watches grpc.health.v1 (Watch, pushed by the server). A stream running
  when the server turns NOT_SERVING must finish whole; calls after that may be refused
  with UNAVAILABLE, before any character.

Only the public client (``client.api``) and the chargpt.v1 / grpc.health.v1 APIs.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from dataclasses import asdict, dataclass

import grpc
from grpc_health.v1 import health_pb2

from chargpt.v1 import language_model_pb2 as pb
from client.api import LanguageModelClient

PROMPT = "ROMEO:"
WORKERS = 3
POLL_SECONDS = 0.02  # GetModelInfo while waiting for a reload: a local call, cheap


@dataclass
class Stream:
    worker: int
    length: int  # characters asked for
    started: float  # time.time() before the call: comparable with loaded_at_unix
    first_at: float | None = None
    ended: float | None = None
    text: str = ""
    finish_reason: str = ""
    sha: str = ""
    step: int = -1
    error: str = ""


class Streams:
    """Workers that keep greedy streams going until ``stop``; every stream is recorded."""

    def __init__(self, client: LanguageModelClient, length: int, timeout: float) -> None:
        self.client = client
        self.length = length
        self.timeout = timeout
        self.stop = threading.Event()
        self.running = threading.Event()  # a stream has received a character
        self.lock = threading.Lock()
        self.done: list[Stream] = []
        self.on_done: list = []
        self.threads = [
            threading.Thread(target=self._work, args=(i,), daemon=True) for i in range(WORKERS)
        ]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def join(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def _work(self, worker: int) -> None:
        length = self.length + worker * self.length // WORKERS
        while not self.stop.is_set():
            stream = Stream(worker, length, time.time())
            try:
                responses = self.client.generate(
                    PROMPT, max_new_tokens=length, temperature=0.0, timeout=self.timeout
                )
                for response in responses:
                    if stream.first_at is None and response.text:
                        stream.first_at = time.time()
                        self.running.set()
                    stream.text += response.text
                    if response.HasField("summary"):
                        summary = response.summary
                        stream.finish_reason = pb.FinishReason.Name(summary.finish_reason)
                        stream.sha = summary.model.weights_sha256
                        stream.step = summary.model.step
            except grpc.RpcError as exc:
                stream.error = f"{exc.code().name}: {exc.details()}"
            stream.ended = time.time()
            with self.lock:
                self.done.append(stream)
                for callback in self.on_done:
                    callback(stream)
            if stream.error:
                return  # refused or broken: this worker is done

    def problems(self) -> list[str]:
        """Every stream that got a character must have finished whole, and greedy streams on
        the same weights must agree (a shorter one is the start of a longer one)."""
        found = []
        for s in self.done:
            if s.first_at is not None and (
                s.error or s.finish_reason != "FINISH_REASON_LENGTH" or len(s.text) != s.length
            ):
                found.append(
                    f"worker {s.worker}: a running stream ended with {s.error or s.finish_reason}"
                    f" after {len(s.text)}/{s.length} characters"
                )
        longest: dict[str, str] = {}
        for s in sorted(self.done, key=lambda s: -len(s.text)):
            if s.sha and not longest.setdefault(s.sha, s.text).startswith(s.text):
                found.append(f"greedy streams on {s.sha[:12]} differ")
        return list(dict.fromkeys(found))


def ready() -> None:
    print("ready", flush=True)


def report(result: dict) -> int:
    print(json.dumps(result), flush=True)
    return 0 if result["ok"] else 1


def across_reload(client: LanguageModelClient, args: argparse.Namespace) -> int:
    old = client.model_info()
    streams = Streams(client, args.length, args.timeout)
    new_streams = threading.Event()
    streams.on_done.append(lambda s: s.sha and s.sha != old.weights_sha256 and new_streams.set())
    streams.start()
    if not streams.running.wait(args.timeout):
        return report({"ok": False, "problems": ["no stream got a character"]})
    ready()

    deadline = time.monotonic() + args.timeout
    new = old
    while new.weights_sha256 == old.weights_sha256 and time.monotonic() < deadline:
        time.sleep(POLL_SECONDS)
        new = client.model_info()
    seen_at = time.time()  # the new weights serve from here on (or earlier)
    problems = []
    if new.weights_sha256 == old.weights_sha256:
        problems.append(f"GetModelInfo still names step {old.step} after {args.timeout:.0f}s")
    elif not new_streams.wait(max(0.0, deadline - time.monotonic())):
        problems.append("no stream ran on the new weights")
    streams.stop.set()
    if not streams.join(args.timeout):
        problems.append("a stream did not end")

    old_streams = [s for s in streams.done if s.sha == old.weights_sha256]
    across = [s for s in old_streams if s.started < new.loaded_at_unix and s.ended > seen_at]
    if new.weights_sha256 != old.weights_sha256 and not across:
        problems.append("no stream was running across the reload")
    problems += [f"a stream was refused: {s.error}" for s in streams.done if s.first_at is None]
    problems += streams.problems()
    return report(
        {
            "ok": not problems,
            "problems": problems,
            "old": {"step": old.step, "sha256": old.weights_sha256},
            "new": {"step": new.step, "sha256": new.weights_sha256},
            "streams": len(streams.done),
            "across": len(across),
            "across_stream": asdict(across[0]) | {"text": None} if across else None,
        }
    )


def across_drain(client: LanguageModelClient, args: argparse.Namespace) -> int:
    not_serving = threading.Event()
    statuses: list[str] = []

    def watch() -> None:
        try:
            for response in client.health_stub.Watch(health_pb2.HealthCheckRequest(service="")):
                status = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
                statuses.append(status)
                if status == "NOT_SERVING" and "SERVING" in statuses:
                    not_serving_at.append(time.time())
                    not_serving.set()
        except grpc.RpcError:
            pass  # the server has gone

    not_serving_at: list[float] = []
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    streams = Streams(client, args.length, args.timeout)
    streams.start()
    if not streams.running.wait(args.timeout):
        return report({"ok": False, "problems": ["no stream got a character"]})
    ready()

    problems = []
    if not not_serving.wait(args.timeout):
        problems.append(f"health never turned NOT_SERVING ({statuses})")
    streams.stop.set()
    if not streams.join(args.timeout):
        problems.append("a stream did not end")
    t = not_serving_at[0] if not_serving_at else float("inf")
    across = [s for s in streams.done if s.first_at is not None and s.first_at < t < s.ended]
    if not_serving_at and not across:
        problems.append("no stream was running when the server turned NOT_SERVING")
    refused = [s for s in streams.done if s.first_at is None and s.error]
    problems += [
        f"refused with {s.error}, not UNAVAILABLE"
        for s in refused
        if not s.error.startswith("UNAVAILABLE")
    ]
    problems += streams.problems()
    return report(
        {
            "ok": not problems,
            "problems": problems,
            "health": statuses,
            "streams": len(streams.done),
            "across": len(across),
            "across_seconds": round(max((s.ended - t for s in across), default=0.0), 3),
            "refused": [s.error for s in refused],
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("event", choices=["across-reload", "across-drain"])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--length", type=int, default=300, help="characters per stream (least)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per wait")
    args = parser.parse_args()
    with LanguageModelClient(args.server, timeout=args.timeout) as client:
        if args.event == "across-reload":
            return across_reload(client, args)
        return across_drain(client, args)


if __name__ == "__main__":
    sys.exit(main())
