"""Training throughput: the lecture's per-head model and training step (the baseline)
against ours, on the same batches, in one process, interleaved.

    python -m bench.train_speed [--data PATH] [--steps 600] [--chunk 50]

Both train the lecture-default model (batch 16, block 32, 8 layers, 4 heads, 64 wide) on
Tiny Shakespeare. The baseline is the lecture's code: one module per head, plain AdamW,
``get_batch`` stacking slices. Ours is the trainer's step: fused QKV + SDPA, fused
AdamW with weight-decay groups, gradient clipping, one gather per batch. The two run
alternately in chunks so that drifts in machine speed hit both alike.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from pathlib import Path

import torch

from bench.lecture import PerHeadGPT
from chargpt.model import GPT
from chargpt.runtime import configure_cpu_threads, keep_freed_memory_mapped
from chargpt.tokenizer import CharTokenizer
from trainer.config import TrainConfig
from trainer.corpus import split_point
from trainer.optim import Optimizers
from trainer.train import train_step

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CHARGPT_TINY_SHAKESPEARE", DEFAULT_DATA))
    parser.add_argument("--steps", type=int, default=600, help="measured steps per model")
    parser.add_argument("--chunk", type=int, default=50, help="steps per turn")
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()

    keep_freed_memory_mapped()
    threads = configure_cpu_threads()
    cfg = TrainConfig()
    text = Path(args.data).read_bytes().decode("utf-8")
    tokenizer = CharTokenizer.from_text(text)
    ids = tokenizer.encode(text)
    data = torch.tensor(ids[: split_point(len(ids))])  # the training split, int64
    config = cfg.model_config(tokenizer.vocab_size)
    generator = torch.Generator().manual_seed(0)
    total = args.warmup + args.steps
    starts = [
        torch.randint(len(data) - cfg.block_size, (cfg.batch_size,), generator=generator)
        for _ in range(total)
    ]

    torch.manual_seed(0)
    lecture_model = PerHeadGPT(config)
    lecture_optimizer = torch.optim.AdamW(lecture_model.parameters(), lr=cfg.learning_rate)
    our_model = GPT(config)
    our_optimizer = Optimizers(our_model, cfg, torch.device("cpu"))
    window = torch.arange(cfg.block_size + 1)

    def lecture_step(ix: torch.Tensor) -> None:  # the lecture's get_batch and loop body
        x = torch.stack([data[i : i + cfg.block_size] for i in ix])
        y = torch.stack([data[i + 1 : i + cfg.block_size + 1] for i in ix])
        _, loss = lecture_model(x, y)
        lecture_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        lecture_optimizer.step()

    def our_step(ix: torch.Tensor) -> None:  # BatchSampler's gather and the trainer's step
        w = data[ix[:, None] + window]
        batches = [(w[:, :-1], w[:, 1:])]
        train_step(our_model, our_optimizer, batches, cfg.grad_clip, contextlib.nullcontext())

    for ix in starts[: args.warmup]:
        lecture_step(ix)
        our_step(ix)
    elapsed = {"lecture": 0.0, "ours": 0.0}
    measured = starts[args.warmup :]
    for begin in range(0, len(measured), args.chunk):
        chunk = measured[begin : begin + args.chunk]
        for name, step in (("lecture", lecture_step), ("ours", our_step)):
            t0 = time.perf_counter()
            for ix in chunk:
                step(ix)
            elapsed[name] += time.perf_counter() - t0

    tokens = len(measured) * cfg.batch_size * cfg.block_size
    print(f"training throughput, lecture-default model, {len(measured)} steps each, "
          f"{threads} threads, torch {torch.__version__}")  # fmt: skip
    for name, label in (("lecture", "baseline (lecture per-head)"), ("ours", "chargpt")):
        seconds = elapsed[name]
        print(f"  {label:26s} {tokens / seconds:9.0f} tokens/s  "
              f"{seconds / len(measured) * 1e3:6.2f} ms/step")  # fmt: skip
    print(f"  ratio chargpt / baseline: {elapsed['lecture'] / elapsed['ours']:.2f}x")


if __name__ == "__main__":
    main()
