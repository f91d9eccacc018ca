"""Serving throughput and latency against the reference generate, in one run.

    python -m bench.serve --checkpoint PATH [--streams 1,8,64] [--chars 256]
    python -m bench.serve --train-iters 1000      (trains a seed-default checkpoint first)

Starts ``chargpt serve`` as its own process, drives it from this process (grpc.aio, one
event loop) with 1, 8 and 64 concurrent streams of 256-character sampled generations,
and prints for each: aggregate characters/s, time to first token p50/p99 and
inter-token latency p50/p99, all measured at the client (per character: the gap between
the arrivals of consecutive characters). In the same run, with the server idle, it times
the reference generate (crop to block_size, full forward, batch 1) on the same
checkpoint: ``chargpt.model.reference_generate`` (our fused model) and the seed's own
per-head model, and prints the ratios.
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

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def reference_rates(checkpoint: Path, chars: int) -> tuple[float, float]:
    """Characters/s of reference_generate and of the seed's generate, batch 1."""
    configure_cpu_threads()
    loaded = load_checkpoint(checkpoint)
    prompt = loaded.tokenizer.encode("ROMEO:")
    reference_generate(loaded.model, prompt, 20)  # warm up
    started = time.perf_counter()
    reference_generate(
        loaded.model, prompt, chars, SamplingParams(), torch.Generator().manual_seed(0)
    )
    ours = chars / (time.perf_counter() - started)

    seed = PerHeadGPT(loaded.info.config).eval()
    seed.load_state_dict(per_head_state_dict(loaded.model))
    block_size = loaded.info.config.block_size
    idx = torch.tensor([prompt])
    started = time.perf_counter()
    with torch.no_grad():  # the lecture's generate
        for _ in range(chars):
            logits, _ = seed(idx[:, -block_size:])
            probs = F.softmax(logits[:, -1, :], dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return ours, chars / (time.perf_counter() - started)


async def one_stream(stub: pb_grpc.LanguageModelStub, chars: int, seed: int) -> dict[str, object]:
    request = pb.GenerateRequest(prompt="ROMEO:", max_new_tokens=chars, seed=seed, temperature=1.0)
    sent = time.perf_counter()
    arrivals: list[float] = []
    summary = None
    async for response in stub.Generate(request):
        now = time.perf_counter()
        arrivals.extend([now] * len(response.text))
        if response.HasField("summary"):
            summary = response.summary
    assert summary is not None and len(arrivals) == chars, "stream ended early"
    return {
        "ttft": arrivals[0] - sent,
        "gaps": [b - a for a, b in itertools.pairwise(arrivals)],
        "chars": len(arrivals),
    }


async def drive(target: str, streams: int, chars: int, rounds: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.LanguageModelStub(channel)
        await one_stream(stub, 16, 0)  # warm up the connection and the server
        results = []
        started = time.perf_counter()
        for r in range(rounds):
            batch = await asyncio.gather(
                *(one_stream(stub, chars, 1000 * r + i) for i in range(streams))
            )
            results.extend(batch)
        wall = time.perf_counter() - started
    total_chars = sum(int(r["chars"]) for r in results)  # type: ignore[call-overload]
    ttfts = [float(r["ttft"]) for r in results]  # type: ignore[arg-type]
    gaps = [g for r in results for g in r["gaps"]]  # type: ignore[attr-defined]
    return {
        "chars_per_s": total_chars / wall,
        "ttft_p50": percentile(ttfts, 50),
        "ttft_p99": percentile(ttfts, 99),
        "itl_p50": percentile(gaps, 50),
        "itl_p99": percentile(gaps, 99),
        "itl_mean": statistics.fmean(gaps),
    }


def train_checkpoint(out_dir: Path, iters: int, data: str) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "chargpt",
            "train",
            "--data",
            data,
            "--out-dir",
            str(out_dir),
            "--max-iters",
            str(iters),
            "--eval-interval",
            str(max(1, iters // 5)),
            "--sample-length",
            "0",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out_dir / "model.safetensors"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument(
        "--train-iters",
        type=int,
        default=1000,
        help="without --checkpoint: train a seed-default model this long",
    )
    parser.add_argument("--data", default=os.environ.get("CHARGPT_TINY_SHAKESPEARE", DEFAULT_DATA))
    parser.add_argument("--streams", default="1,8,64")
    parser.add_argument("--chars", type=int, default=256)
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        help="extra chargpt serve flag, e.g. --server-arg=--max-running=64",
    )
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or train_checkpoint(
            Path(tmp), args.train_iters, str(args.data)
        )
        ours_ref, seed_ref = reference_rates(checkpoint, args.chars)
        port = free_port()
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "chargpt",
                "serve",
                "--checkpoint",
                str(checkpoint),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--metrics-port",
                "0",
                *args.server_arg,
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            target = f"127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                check = subprocess.run(
                    [sys.executable, "-m", "chargpt", "health", "--server", target],
                    capture_output=True,
                )
                if check.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise SystemExit("server did not become SERVING")
                time.sleep(0.5)
            print(f"checkpoint {checkpoint}; {args.chars}-character sampled generations")
            print(
                f"reference generate, batch 1: chargpt.model.reference_generate "
                f"{ours_ref:.0f} chars/s; the seed's per-head model {seed_ref:.0f} chars/s"
            )
            print(
                f"{'streams':>7} {'chars/s':>9} {'x ref':>6} {'x seed':>6} "
                f"{'TTFT p50':>9} {'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8}"
            )
            for streams in (int(s) for s in args.streams.split(",")):
                rounds = 4 if streams == 1 else 2 if streams <= 8 else 1
                r = asyncio.run(drive(target, streams, args.chars, rounds))
                print(
                    f"{streams:>7} {r['chars_per_s']:>9.0f} {r['chars_per_s'] / ours_ref:>6.2f} "
                    f"{r['chars_per_s'] / seed_ref:>6.2f} {r['ttft_p50'] * 1e3:>7.1f}ms "
                    f"{r['ttft_p99'] * 1e3:>7.1f}ms {r['itl_p50'] * 1e3:>6.2f}ms "
                    f"{r['itl_p99'] * 1e3:>6.2f}ms",
                    flush=True,
                )
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(60)


if __name__ == "__main__":
    main()
