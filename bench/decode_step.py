"""The serving decode step alone, eager against compiled, in one process, interleaved.

    python -m bench.decode_step --checkpoint PATH [--batch-sizes 1,16,64] [--steps 200]

For each batch size, B rows of 40 characters are prefilled into two decoders of the same
model, one eager (``Decoder(model, slots)``) and one compiled (``compile=True``, built
first: the compile time is printed), and ``Decoder.decode`` is timed on each in turns,
three rounds, medians. The compiled logits are checked against the eager ones first.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass, field

import torch

from chargpt.checkpoint import load_checkpoint
from chargpt.runtime import configure_cpu_threads
from server.decoder import Decoder


@dataclass
class Row:
    id: int
    tokens: list[int] = field(default_factory=lambda: [1] * 40)
    computed: int = 0


def rows(decoder: Decoder, count: int) -> list[Row]:
    """``count`` rows prefilled into ``decoder``, each with one new token to decode."""
    out = [Row(i) for i in range(count)]
    for row in out:
        decoder.start(row)
    decoder.prefill([(row, len(row.tokens)) for row in out])
    for row in out:
        row.computed = len(row.tokens)
        row.tokens.append(2)
    return out


def ms_per_step(decoder: Decoder, batch: list[Row], steps: int) -> float:
    for _ in range(10):
        decoder.decode(batch)
    started = time.perf_counter()
    for _ in range(steps):
        decoder.decode(batch)
    return (time.perf_counter() - started) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    configure_cpu_threads()
    model = load_checkpoint(args.checkpoint).model.eval()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    slots = max(sizes)
    started = time.perf_counter()
    compiled = Decoder(model, slots, compile=True)
    if compiled.compiled is None:
        raise SystemExit("could not compile here (see the log line above)")
    took = time.perf_counter() - started
    print(f"compiled batch sizes {compiled.compiled.sizes} in {took:.1f} s")
    eager = Decoder(model, slots)
    with torch.inference_mode():
        for size in sizes:
            e_rows, c_rows = rows(eager, size), rows(compiled, size)
            torch.testing.assert_close(
                compiled.decode(c_rows), eager.decode(e_rows), rtol=1e-5, atol=1e-5
            )
            times = [
                (ms_per_step(eager, e_rows, args.steps), ms_per_step(compiled, c_rows, args.steps))
                for _ in range(3)
            ]
            e = statistics.median(t[0] for t in times)
            c = statistics.median(t[1] for t in times)
            print(f"batch {size:>3}: eager {e:.3f} ms, compiled {c:.3f} ms, eager / compiled "
                  f"{e / c:.2f}", flush=True)  # fmt: skip
            for row in e_rows:
                eager.release(row.id)
            for row in c_rows:
                compiled.release(row.id)


if __name__ == "__main__":
    main()
