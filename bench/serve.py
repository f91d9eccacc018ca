"""Serving throughput and latency, for the lecture-shaped model and a windowed rotary
model of the same width and depth, against the reference generate, in one run.

    python -m bench.serve                      (trains both models first, a few minutes)
    python -m bench.serve --lecture PATH --windowed PATH [--streams 1,8,64] [--chars 256]
                          [--modes eager,compiled]

For each model, and each decode step (eager: ``--no-compile``; compiled: ``--compile``,
the compile time shown as the time to SERVING), it starts ``chargpt serve`` as its own
process and drives it from this
process (grpc.aio, one event loop) with 1, 8 and 64 concurrent streams of 256-character
sampled generations, and prints aggregate characters/s, time to first token p50/p99 and
inter-token latency p50/p99, measured at the client (per character: the gap between the
arrivals of consecutive characters). With the server idle, it times the reference
generate at batch 1 on the lecture-shaped checkpoint (the lecture's own per-head model,
and ``chargpt.model.reference_generate``) and prints the ratios.

It ends with the ratio compiled / eager of each figure's characters/s. Then fairness
(on the first mode): the inter-token latency of a 300-character greedy stream alone and beside
a 16,384-character Score, and the Score's own time alone and beside the stream.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch
import torch.nn.functional as F

from bench.lecture import PerHeadGPT, per_head_state_dict
from chargpt.checkpoint import load_checkpoint
from chargpt.model import reference_generate
from chargpt.runtime import configure_cpu_threads
from chargpt.sampling import SamplingParams
from chargpt.v1 import language_model_pb2 as pb
from chargpt.v1 import language_model_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
# The windowed model: the lecture's width and depth, rotary positions, each position
# attending to the 32 before it (the lecture's context), trained on 128-character blocks.
WINDOWED_FLAGS = ["--position", "rope", "--attention-window", "32", "--block-size", "128"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def reference_rates(checkpoint: Path, chars: int) -> tuple[float, float]:
    """Characters/s of reference_generate and of the lecture's generate, batch 1."""
    configure_cpu_threads()
    loaded = load_checkpoint(checkpoint)
    prompt = loaded.tokenizer.encode("ROMEO:")
    reference_generate(loaded.model, prompt, 20)  # warm up
    started = time.perf_counter()
    reference_generate(loaded.model, prompt, chars, SamplingParams(), seed=0)
    ours = chars / (time.perf_counter() - started)

    lecture = PerHeadGPT(loaded.info.config).eval()
    lecture.load_state_dict(per_head_state_dict(loaded.model))
    block_size = loaded.info.config.block_size
    idx = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():  # the lecture's generate
        for _ in range(chars):
            logits, _ = lecture(idx[:, -block_size:])
            probs = F.softmax(logits[:, -1, :], dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return ours, chars / (time.perf_counter() - started)


async def one_stream(
    stub: pb_grpc.LanguageModelStub,
    chars: int,
    seed: int,
    temperature: float = 1.0,
    per_message: int = 1,
) -> dict[str, object]:
    request = pb.GenerateRequest(
        prompt="ROMEO:",
        max_new_tokens=chars,
        seed=seed,
        temperature=temperature,
        characters_per_message=per_message,
    )
    sent = time.perf_counter()
    arrivals: list[float] = []
    async for response in stub.Generate(request):
        now = time.perf_counter()
        arrivals.extend([now] * len(response.text))
    assert len(arrivals) == chars, "stream ended early"
    return {"ttft": arrivals[0] - sent, "gaps": [b - a for a, b in itertools.pairwise(arrivals)]}


async def drive(
    target: str, streams: int, chars: int, rounds: int, per_message: int = 1
) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LanguageModelStub(channel)
        await one_stream(stub, 16, 0)  # warm up the connection and the server
        results = []
        started = time.perf_counter()
        for r in range(rounds):
            batch = await asyncio.gather(
                *(
                    one_stream(stub, chars, 1000 * r + i, per_message=per_message)
                    for i in range(streams)
                )
            )
            results.extend(batch)
        wall = time.perf_counter() - started
    ttfts = [float(r["ttft"]) for r in results]  # type: ignore[arg-type]
    gaps = [g for r in results for g in r["gaps"]]  # type: ignore[attr-defined]
    return {
        "chars_per_s": len(results) * chars / wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
    }


async def fairness(target: str, score_chars: int, text: str) -> dict[str, float]:
    """A greedy 300-character stream alone, a long Score alone, then both together."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LanguageModelStub(channel)
        await one_stream(stub, 16, 0)
        alone = await one_stream(stub, 300, 0, temperature=0.0)
        started = time.perf_counter()
        await stub.Score(pb.ScoreRequest(text=text[:score_chars]))
        score_alone = time.perf_counter() - started

        async def timed_score() -> float:
            t0 = time.perf_counter()
            await stub.Score(pb.ScoreRequest(text=text[:score_chars]))
            return time.perf_counter() - t0

        score_task = asyncio.ensure_future(timed_score())
        await asyncio.sleep(0.2)  # let the Score start: the stream then runs beside it
        beside = await one_stream(stub, 300, 0, temperature=0.0)
        score_shared = await score_task
    return {
        "itl_alone": statistics.fmean(alone["gaps"]),  # type: ignore[arg-type]
        "itl_beside": statistics.fmean(beside["gaps"]),  # type: ignore[arg-type]
        "score_alone": score_alone,
        "score_shared": score_shared,
    }


def train(out_dir: Path, iters: int, data: str, *flags: str) -> Path:
    subprocess.run(
        [sys.executable, "-m", "chargpt", "train", "--data", data, "--out-dir", str(out_dir),
         "--max-iters", str(iters), "--eval-interval", str(max(1, iters // 5)),
         "--sample-length", "0", *flags],
        check=True, stdout=subprocess.DEVNULL,
    )  # fmt: skip
    return out_dir / "model.safetensors"


class Server:
    """``chargpt serve`` in its own process, SERVING on a free port."""

    def __init__(self, checkpoint: Path, args: list[str]) -> None:
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "chargpt", "serve", "--checkpoint", str(checkpoint),
             "--host", "127.0.0.1", "--port", str(self.port), "--metrics-port", "0", *args],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        wait = [sys.executable, "-m", "chargpt", "health", "--server", self.target,
                "--wait", "900"]  # fmt: skip  # (a compiling server takes minutes)
        if subprocess.run(wait, capture_output=True).returncode:
            self.proc.kill()
            raise SystemExit("server did not become SERVING")

    def close(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lecture", type=Path, help="a lecture-shaped checkpoint")
    parser.add_argument("--windowed", type=Path, help="a windowed rotary checkpoint")
    parser.add_argument("--train-iters", type=int, default=1000,
                        help="train the models not given, this many steps each")  # fmt: skip
    parser.add_argument("--data", default=os.environ.get("CHARGPT_TINY_SHAKESPEARE", DEFAULT_DATA))
    parser.add_argument("--streams", default="1,8,64")
    parser.add_argument(
        "--modes",
        default="eager,compiled",
        help="decode steps to run each model with: eager (--no-compile), compiled (--compile)",
    )
    parser.add_argument("--chars", type=int, default=256)
    parser.add_argument(
        "--chars-per-message",
        type=int,
        default=1,
        help="characters_per_message of each stream (1: every character its own message)",
    )
    parser.add_argument("--score-chars", type=int, default=16_384)
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra chargpt serve flag, e.g. --server-arg=--max-running=32",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        lecture = args.lecture or train(Path(tmp, "lecture"), args.train_iters, str(args.data))
        windowed = args.windowed or train(
            Path(tmp, "windowed"), args.train_iters, str(args.data), *WINDOWED_FLAGS
        )
        ours_ref, lecture_ref = reference_rates(lecture, args.chars)
        print(f"{args.chars}-character sampled generations; reference generate at batch 1 on "
              f"the lecture-shaped model: the lecture's per-head model {lecture_ref:.0f} "
              f"chars/s, chargpt.model.reference_generate {ours_ref:.0f} chars/s")  # fmt: skip
        print(f"{'model':>9} {'mode':>8} {'streams':>7} {'chars/s':>9} {'x lecture':>9} "
              f"{'x ref':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} "
              f"{'ITL p99':>8}")  # fmt: skip
        modes = args.modes.split(",")
        rates: dict[tuple[str, str, int], float] = {}
        for (name, checkpoint), mode in itertools.product(
            (("lecture", lecture), ("windowed", windowed)), modes
        ):
            flag = "--compile" if mode == "compiled" else "--no-compile"
            started = time.perf_counter()
            server = Server(checkpoint, [flag, *args.server_arg])
            print(f"{name} {mode}: SERVING after {time.perf_counter() - started:.0f} s",
                  flush=True)  # fmt: skip
            try:
                for streams in (int(s) for s in args.streams.split(",")):
                    rounds = 4 if streams == 1 else 2 if streams <= 8 else 1
                    r = asyncio.run(
                        drive(server.target, streams, args.chars, rounds, args.chars_per_message)
                    )
                    rates[name, mode, streams] = r["chars_per_s"]
                    print(
                        f"{name:>9} {mode:>8} {streams:>7} {r['chars_per_s']:>9.0f} "
                        f"{r['chars_per_s'] / lecture_ref:>9.1f} "
                        f"{r['chars_per_s'] / ours_ref:>6.2f} {r['ttft_p50'] * 1e3:>7.1f}ms "
                        f"{r['ttft_p99'] * 1e3:>7.1f}ms {r['itl_p50'] * 1e3:>6.2f}ms "
                        f"{r['itl_p99'] * 1e3:>6.2f}ms",
                        flush=True,
                    )
                if name == "lecture" and mode == modes[0]:
                    text = Path(args.data).read_text()[-args.score_chars - 1000 :]
                    f = asyncio.run(fairness(server.target, args.score_chars, text))
                    alone = f["itl_alone"] * 1e3
                    print(
                        f"fairness (lecture): 300-char stream ITL alone {alone:.2f} ms, "
                        f"beside a {args.score_chars}-char Score "
                        f"{f['itl_beside'] * 1e3:.2f} ms ({f['itl_beside'] / f['itl_alone']:.2f}x);"
                        f" the Score alone {f['score_alone']:.1f} s, beside the stream "
                        f"{f['score_shared']:.1f} s",
                        flush=True,
                    )
            finally:
                server.close()
        if {"eager", "compiled"} <= set(modes):
            for (name, mode, streams), rate in rates.items():
                if mode == "compiled":
                    eager = rates[name, "eager", streams]
                    print(f"compiled / eager, {name}, {streams} streams: {rate / eager:.2f}")


if __name__ == "__main__":
    main()
