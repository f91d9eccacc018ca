"""The whole default training run, ours against the seed's, on the same machine.

    python bench/train_e2e.py [--data PATH]   (about 10 minutes on 2 CPU cores)

Runs ``bench/seed_gpt.py`` (the lecture's gpt.py with the seed's defaults) and then
``chargpt train`` with its defaults (5000 steps, exact evaluation of both splits every
100), each as its own process, and prints wall times, final validation losses and the
ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parents[1] / "shared" / "data" / "tinyshakespeare.txt"


def timed(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CHARGPT_TINY_SHAKESPEARE", DEFAULT_DATA))
    args = parser.parse_args()

    seed_seconds, seed_out = timed([sys.executable, str(HERE / "seed_gpt.py"), str(args.data)])
    seed_val = float(re.findall(r"step 4999: train loss [\d.]+, val loss ([\d.]+)", seed_out)[-1])
    print(f"seed gpt.py:    {seed_seconds:6.1f} s wall, val loss {seed_val:.4f} "
          "(estimated from 200 random batches)", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as out:
        ours_seconds, _ = timed(
            [sys.executable, "-m", "chargpt", "train", "--data", str(args.data), "--out-dir", out]
        )
        log = [json.loads(line) for line in Path(out, "log.jsonl").read_text().splitlines()]
    last, best = log[-1], min(r["val_loss"] for r in log)
    print(f"chargpt train:  {ours_seconds:6.1f} s wall, val loss {last['val_loss']:.4f} at step "
          f"{last['step']} (exact, whole split), best {best:.4f}")  # fmt: skip
    print(f"wall-time ratio seed / chargpt: {seed_seconds / ours_seconds:.2f}x")


if __name__ == "__main__":
    main()
