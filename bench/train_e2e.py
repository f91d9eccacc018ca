"""The whole default training run, ours against the lecture's, on the same machine.

    python -m bench.train_e2e [--data PATH]   (about 10 minutes on 2 CPU cores)

Runs ``bench/lecture_gpt.py`` (the lecture's gpt.py with its defaults) and then
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
    result = subprocess.run(command, capture_output=True, text=True, check=True, cwd=HERE.parent)
    return time.perf_counter() - started, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=os.environ.get("CHARGPT_TINY_SHAKESPEARE", DEFAULT_DATA))
    args = parser.parse_args()

    lecture_seconds, lecture_out = timed(
        [sys.executable, "-m", "bench.lecture_gpt", str(args.data)]
    )
    lecture_val = float(
        re.findall(r"step 4999: train loss [\d.]+, val loss ([\d.]+)", lecture_out)[-1]
    )
    print(f"lecture gpt.py: {lecture_seconds:6.1f} s wall, val loss {lecture_val:.4f} "
          "(estimated from 200 random batches)", flush=True)  # fmt: skip

    with tempfile.TemporaryDirectory() as out:
        ours_seconds, _ = timed(
            [sys.executable, "-m", "chargpt", "train", "--data", str(args.data), "--out-dir", out]
        )
        log = [json.loads(line) for line in Path(out, "log.jsonl").read_text().splitlines()]
    last, best = log[-1], min(r["val_loss"] for r in log)
    print(f"chargpt train:  {ours_seconds:6.1f} s wall, val loss {last['val_loss']:.4f} at step "
          f"{last['step']} (exact, whole split), best {best:.4f}")  # fmt: skip
    print(f"wall-time ratio lecture / chargpt: {lecture_seconds / ours_seconds:.2f}x")


if __name__ == "__main__":
    main()
