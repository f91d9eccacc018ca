"""The CPU presets against nanoGPT's CPU recipe shape, for the same training time.

    python -m bench.speedrun [--preset cpu-100s] [--seeds 1337 1338 1339] [--data FILE]
                             [--baseline-seeds N] [--plot FILE.png]

For each seed, in turns: ``chargpt train --preset P --seed S`` and, with the same time
budget and seed, nanoGPT's CPU recipe shape (its README's "shakespeare_char on a
MacBook": 4 layers, 128 wide, 4 heads, block 64, batch 12, AdamW lr 1e-3 with cosine
decay to 1e-4, dropout 0) trained by our trainer. Each run is a ``chargpt train``
process; its numbers come from its ``log.jsonl``: the validation loss over the whole
validation split at the end (exact, nats per character), the steps, training seconds
and tokens per second. Prints every run, then the median and spread (min to max) of each
recipe and the ratio of the medians. ``--preset all`` runs every CPU preset. ``--plot``
draws each run's validation loss against training seconds (thin) and each recipe's median
(bold), one panel per preset (needs matplotlib: ``pip install 'chargpt[plot]'``).

Wall time counts: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from chargpt.plot import Curve, PlotError, plot_speedrun, read_log, require_matplotlib
from trainer.presets import read_preset

CPU_PRESETS = ("cpu-100s", "cpu-10min")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
NANOGPT_CPU = [
    "--n-layer=4", "--n-head=4", "--n-embd=128", "--block-size=64", "--batch-size=12",
    "--learning-rate=1e-3", "--min-lr=1e-4", "--lr-schedule=cosine", "--dropout=0",
    "--warmup-iters=100",
]  # fmt: skip


@dataclass(frozen=True)
class Result:
    recipe: str
    seed: int
    val_loss: float  # exact, over the whole validation split
    steps: int
    tokens: int
    train_s: float
    wall_s: float
    sample: str
    curve: Curve  # every evaluation of the run, from its log.jsonl

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s


def train(recipe: str, args: list[str], seed: int, data: Path, work: Path) -> Result:
    """One ``chargpt train`` run, and what its log says."""
    out = work / f"{recipe}-{seed}"
    command = [
        sys.executable, "-m", "chargpt", "train", *args, f"--seed={seed}", f"--data={data}",
        f"--data-dir={work / 'data'}", f"--out-dir={out}", "--overwrite", "--device=cpu",
        "--sample-length=200",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"{recipe} (seed {seed}) failed:\n{done.stderr[-2000:]}")
    return read_result(recipe, seed, out, wall, done.stdout)


def read_result(recipe: str, seed: int, out: Path, wall_s: float, stdout: str) -> Result:
    """What a finished budgeted run in ``out`` logged, and the sample it printed."""
    log = out / "log.jsonl"
    last = json.loads(log.read_text().splitlines()[-1])
    sample = stdout.split("--- sample from the best model ---\n", 1)[-1].split("\n---")[0]
    return Result(
        recipe, seed, last["exact_val_loss"], last["step"], last["tokens"], last["train_s"],
        wall_s, sample, read_log(log),
    )  # fmt: skip


def summary(results: list[Result]) -> tuple[float, float, float]:
    """Median, min and max validation loss."""
    losses = [r.val_loss for r in results]
    return statistics.median(losses), min(losses), max(losses)


def plot(panels: Mapping[str, Mapping[str, Sequence[Result]]], output: Path) -> Path:
    """Draw ``panels`` (a title, then each recipe's runs) into ``output``; a recipe with no
    runs (``--baseline-seeds 0``) is left out."""
    curves = {
        title: {name: [r.curve for r in runs] for name, runs in recipes.items() if runs}
        for title, recipes in panels.items()
    }
    try:
        return plot_speedrun(curves, output)
    except PlotError as exc:
        raise SystemExit(f"Error: {exc}") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-100s", choices=(*CPU_PRESETS, "all"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337, 1338, 1339])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get(
        "CHARGPT_TINY_SHAKESPEARE", DEFAULT_DATA)))  # fmt: skip
    parser.add_argument(
        "--baseline-seeds", type=int, default=None,
        help="run the baseline with only the first N seeds (default: all; 0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png",
        help="draw validation loss against training seconds, every run and the medians",
    )  # fmt: skip
    args = parser.parse_args(argv)
    presets = CPU_PRESETS if args.preset == "all" else (args.preset,)
    if args.plot is not None:  # before minutes of training, not after
        try:
            require_matplotlib("bench.speedrun --plot")
        except PlotError as exc:
            raise SystemExit(f"Error: {exc}") from None
        if not args.plot.resolve().parent.is_dir():
            raise SystemExit(f"Error: cannot write {args.plot}: no such directory")
    panels: dict[str, dict[str, list[Result]]] = {}

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for preset in presets:
            budget = read_preset(preset)["time_budget"]
            recipes = {preset: [f"--preset={preset}"]}
            if args.baseline_seeds != 0:  # same budget, same evaluation sample, same seed
                eval_tokens = read_preset(preset).get("eval_tokens", 0)
                recipes["nanoGPT-cpu"] = [
                    *NANOGPT_CPU, f"--time-budget={budget}", f"--eval-tokens={eval_tokens}",
                    f"--eval-interval={read_preset(preset).get('eval_interval', 100)}",
                ]  # fmt: skip
            print(f"{preset}: {budget:.0f} s of training, seeds {args.seeds}", flush=True)
            results: dict[str, list[Result]] = {name: [] for name in recipes}
            panels[f"{preset}: {budget:.0f} s of training"] = results
            baseline_seeds = args.seeds[: args.baseline_seeds]
            for seed in args.seeds:
                for name, recipe_args in recipes.items():
                    if name == "nanoGPT-cpu" and seed not in baseline_seeds:
                        continue
                    r = train(name, recipe_args, seed, args.data, work)
                    results[name].append(r)
                    print(
                        f"  {name:12s} seed {seed}: val {r.val_loss:.4f}  {r.steps:6d} steps  "
                        f"{r.tokens_per_s:7.0f} tok/s  {r.train_s:6.1f} s training  "
                        f"{r.wall_s:6.1f} s wall",
                        flush=True,
                    )
            medians = {}
            for name, runs in results.items():
                median, low, high = summary(runs)
                medians[name] = median
                tok_s = statistics.median(r.tokens_per_s for r in runs)
                print(
                    f"  {name:12s} median val {median:.4f} (spread {low:.4f}-{high:.4f}), "
                    f"{tok_s:.0f} tok/s"
                )
            if "nanoGPT-cpu" in medians:
                print(
                    f"  {preset} / nanoGPT-cpu validation loss: "
                    f"{medians[preset] / medians['nanoGPT-cpu']:.3f}"
                )
            best = min(results[preset], key=lambda r: abs(r.val_loss - medians[preset]))
            print(f"  sample (seed {best.seed}, the median run):\n{best.sample}\n")
    if args.plot is not None:
        print(f"plot: {plot(panels, args.plot)}")


if __name__ == "__main__":
    main()
