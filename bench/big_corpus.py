"""A corpus larger than memory: preprocessing time and the trainer's peak memory on a
1 GB text, and the 1 MB Tiny Shakespeare path against the in-memory one it replaced.

    python -m bench.big_corpus [--size-mb 1024] [--steps 200] [--work-dir DIR]

1. Writes a deterministic UTF-8 text of --size-mb (random words: mostly ASCII, with
   accented Latin, Greek, Cyrillic, 300 CJK characters and emoji, so the vocabulary
   passes 256 characters and the cache holds uint16 ids).
2. Trains --steps steps on it with ``chargpt train`` in a subprocess, twice: the first run
   encodes the cache, the second reuses it. For each: the time to each stage (read from
   the trainer's own lines as they arrive), and the child's peak resident memory
   (``ru_maxrss`` from ``wait4``: the high-water mark of the process, file pages it
   mapped included). Target: under 1 GB for a 1 GB text.
3. Tiny Shakespeare in this process: setup (today's: hash, check the cache and map it,
   or build it; before: read the text, encode it into a list and an int64 tensor,
   gather every evaluation batch) and training steps/s of the lecture-default model on
   batches drawn both ways, in alternating turns. Target: no slower.

Files go to --work-dir (default: a temporary directory, removed at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from chargpt.model import GPT
from chargpt.runtime import configure_cpu_threads, keep_freed_memory_mapped
from chargpt.tokenizer import CharTokenizer
from trainer.batches import BatchSampler, EvalWindows
from trainer.config import TrainConfig
from trainer.corpus import Corpus, prepare_corpus
from trainer.optim import Optimizers
from trainer.train import train_step

REPO = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
MB = 1 << 20


# Words of each script, space-separated, and the share of the words drawn from it.
SCRIPTS = [
    (
        "the and of to a in that is was he for it with as his on be at by I had not are but "
        "from or have an they which one you were her all she there would their we him been "
        "has when who will more no if out so said what up its about into than them can only "
        "other new some could time these two may then do first any my now such ROMEO: "
        "JULIET: First Citizen: KING HENRY VI: , . ; ! ? -- 'tis o'er 1066 42",
        0.90,
    ),
    ("café naïve façade über Straße déjà-vu señor coöperate Ångström smörgåsbord", 0.02),
    ("λόγος ἀρετή φιλοσοφία θάλασσα ψυχή", 0.01),
    ("привет мир слово книга время", 0.01),
    (" ".join(chr(0x4E00 + i) + chr(0x4E00 + (7 * i + 3) % 300) for i in range(300)), 0.009),
    ("🙂 🚀 ❤️ 🎭 🌹", 0.001),
]


def words() -> tuple[np.ndarray, np.ndarray]:
    """The words the text is made of, and the probability of drawing each."""
    groups = [(text.split(), share) for text, share in SCRIPTS]
    vocab = np.array([word for words, _ in groups for word in words], dtype=object)
    weights = np.concatenate([np.full(len(words), share / len(words)) for words, share in groups])
    return vocab, weights / weights.sum()


def write_text(path: Path, size: int, seed: int = 0) -> None:
    """At least ``size`` bytes of text, the same for the same size and seed: 64
    paragraphs of random words (about 1 MB each), in a random order."""
    vocab, weights = words()
    rng = np.random.default_rng(seed)
    paragraphs = []
    for _ in range(64):
        drawn = vocab[rng.choice(len(vocab), 170_000, p=weights)]
        after = np.where(rng.random(len(drawn)) < 1 / 12, "\n", " ").astype(object)
        paragraphs.append("".join(np.column_stack([drawn, after]).ravel()).encode())
    written = 0
    with open(path, "wb") as file:
        while written < size:
            paragraph = paragraphs[rng.integers(len(paragraphs))]
            file.write(paragraph)
            written += len(paragraph)


def train_and_watch(
    data: Path, work: Path, steps: int, label: str
) -> tuple[dict[str, float], list[str], int]:
    """Run ``chargpt train`` on ``data``: the seconds from start at which each of its
    lines arrived (by pattern), its lines, and its peak RSS in bytes."""
    out = work / "out"
    command = [
        sys.executable, "-m", "chargpt", "train", "--data", str(data), "--data-dir",
        str(work / "data"), "--out-dir", str(out), "--overwrite", "--max-iters", str(steps),
        "--eval-interval", str(steps), "--eval-tokens", "4096", "--sample-length", "0",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHARGPT_")}
    started = time.monotonic()
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    lines, seen = [], {}
    assert process.stdout is not None
    for line in process.stdout:
        lines.append(line.rstrip("\n"))
        for name, pattern in (
            ("encoding", "^encoding "),
            ("encoded", "^encoded "),
            ("set up", r"^run-.*parameters"),
            ("trained", rf"^step {steps}/"),
        ):
            if re.search(pattern, line) and name not in seen:
                seen[name] = time.monotonic() - started
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seen["exited"] = time.monotonic() - started
    if process.returncode != 0:
        print("\n".join(lines[-20:]))
        raise SystemExit(f"{label}: chargpt train exited {process.returncode}")
    return seen, lines, usage.ru_maxrss * 1024  # Linux reports kilobytes


def big_corpus(work: Path, size_mb: int, steps: int, tiny_shakespeare: Path) -> None:
    text = work / "big.txt"
    started = time.monotonic()
    write_text(text, size_mb * MB)
    size = text.stat().st_size
    print(f"text: {text} {size / MB:,.0f} MB, written in {time.monotonic() - started:.1f} s")
    runs = [
        (text, "first run (encodes the cache)"),
        (text, "second run (reuses it)"),
        (tiny_shakespeare, "for reference, the same on Tiny Shakespeare"),
    ]
    for data, label in runs:
        seen, lines, peak = train_and_watch(data, work, steps, label)
        stages = ", ".join(f"{name} {at:.1f} s" for name, at in seen.items())
        print(f"{label}: {stages}")
        for line in lines:
            if line.startswith(("encoding", "encoded", "run-")):
                print(f"    | {line}")
        print(f"  from start to the first step: {seen['set up']:.1f} s")
        print(f"  peak RSS of the trainer: {peak / MB:,.0f} MB  (target: < 1024 MB)")
    for cache in sorted((work / "data").glob("corpus-*.bin")):
        print(f"cache: {cache.name} {cache.stat().st_size / MB:,.1f} MB")


# ---------------------------------------------------------------------------------------
# Tiny Shakespeare: today's corpus against the in-memory one it replaced


class InMemoryCorpus:
    """The construction before the cache (trainer/data.py at e178a97): the whole text as
    a string, a list of ints and an int64 tensor; evaluation batches gathered at setup."""

    def __init__(self, path: Path, cfg: TrainConfig) -> None:
        raw = path.read_bytes()
        text, self.sha256 = raw.decode("utf-8"), hashlib.sha256(raw).hexdigest()
        self.tokenizer = CharTokenizer.from_text(text)
        data = torch.tensor(self.tokenizer.encode(text), dtype=torch.long)
        n_train = int(0.9 * len(data))
        self.train, self.val = data[:n_train], data[n_train:]
        self.block_size, self.batch_size = cfg.block_size, cfg.batch_size
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.eval_batches = {
            "val": windows_in_memory(self.val, cfg.block_size, cfg.eval_batch_size),
            "train": windows_in_memory(
                self.train, cfg.block_size, cfg.eval_batch_size, len(self.val) - 1
            ),
        }

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            len(self.train) - self.block_size, (self.batch_size,), generator=self.generator
        )
        w = self.train[starts[:, None] + torch.arange(self.block_size + 1)]
        return w[:, :-1], w[:, 1:]


def windows_in_memory(
    data: torch.Tensor, block_size: int, batch_size: int, n_targets: int | None = None
) -> list[torch.Tensor]:
    """The old evaluation batches: covering all of ``data`` (``n_targets`` None) or
    ``n_targets`` spread over it, every window gathered up front."""
    if n_targets is None:
        starts = torch.arange((len(data) - 1) // block_size) * block_size
    else:
        n_full = min(n_targets, len(data) - 1) // block_size
        starts = torch.linspace(0, len(data) - block_size - 1, n_full).long()
    window = torch.arange(block_size + 1)
    return [
        data[starts[i : i + batch_size, None] + window] for i in range(0, len(starts), batch_size)
    ]


def cached_setup(path: Path, data_dir: Path, cfg: TrainConfig) -> BatchSampler:
    """What ``chargpt train`` now does before its first step, for the corpus."""
    corpus = Corpus.open(
        prepare_corpus(path, data_dir, cfg.block_size, log=lambda _: None), cfg.block_size
    )
    val = EvalWindows.covering(corpus.val, cfg.block_size)
    EvalWindows.spread(corpus.train, cfg.block_size, val.num_targets)
    return BatchSampler(corpus.train, cfg.block_size, cfg.batch_size, cfg.seed)


def timed(function: Callable[[], object]) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def tiny_shakespeare(work: Path, path: Path, steps: int, repeats: int = 7) -> None:
    keep_freed_memory_mapped()
    threads = configure_cpu_threads()
    cfg = TrainConfig()
    print(f"\nTiny Shakespeare ({path.stat().st_size:,} bytes), {threads} threads")

    def build() -> None:
        shutil.rmtree(work / "ts", ignore_errors=True)
        cached_setup(path, work / "ts", cfg)

    setups: dict[str, list[float]] = {"in memory (before)": [], "cache: build": []}
    setups["cache: reuse"] = []
    for _ in range(repeats):  # alternating, so that drifts in machine speed hit all alike
        setups["in memory (before)"].append(timed(lambda: InMemoryCorpus(path, cfg)))
        setups["cache: build"].append(timed(build))
        setups["cache: reuse"].append(timed(lambda: cached_setup(path, work / "ts", cfg)))
    before = statistics.median(setups["in memory (before)"])
    print(f"  setup, median of {repeats}:")
    for name, seconds in setups.items():
        ratio = before / statistics.median(seconds)
        print(f"    {name:20s} {statistics.median(seconds) * 1e3:8.1f} ms   {ratio:5.2f}x")

    samplers = {"in memory (before)": InMemoryCorpus(path, cfg)}
    samplers["cache"] = cached_setup(path, work / "ts", cfg)  # type: ignore[assignment]
    torch.manual_seed(0)
    model = GPT(cfg.model_config(65))
    optimizer = Optimizers(model, cfg, torch.device("cpu"))
    elapsed = dict.fromkeys(samplers, 0.0)
    gathered = dict.fromkeys(samplers, 0.0)
    chunk = 10
    for turn in range(-1, steps // chunk):  # turn -1 warms up
        for name, sampler in samplers.items():
            for _ in range(chunk):
                t0 = time.perf_counter()
                x, y = sampler.next_batch()
                t1 = time.perf_counter()
                train_step(model, optimizer, [(x, y)], cfg.grad_clip, contextlib.nullcontext())
                if turn >= 0:
                    gathered[name] += t1 - t0
                    elapsed[name] += time.perf_counter() - t0
    measured = steps // chunk * chunk
    print(f"  training, lecture-default model, {measured} steps each in turns of {chunk}:")
    for name in samplers:
        print(
            f"    {name:20s} {measured / elapsed[name]:6.1f} steps/s   "
            f"batch drawn in {gathered[name] / measured * 1e6:5.0f} us   "
            f"{elapsed['in memory (before)'] / elapsed[name]:5.2f}x"
        )


@contextlib.contextmanager
def work_dir(path: str | None) -> Iterator[Path]:
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="big-corpus-") as tmp:
        yield Path(tmp)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=200, help="training steps on the big text")
    parser.add_argument("--ts-steps", type=int, default=200, help="steps each, Tiny Shakespeare")
    parser.add_argument("--tiny-shakespeare", type=Path, default=TINY_SHAKESPEARE)
    parser.add_argument("--work-dir")
    args = parser.parse_args()
    with work_dir(args.work_dir) as work:
        big_corpus(work, args.size_mb, args.steps, args.tiny_shakespeare)
        tiny_shakespeare(work, args.tiny_shakespeare, args.ts_steps)


if __name__ == "__main__":
    main()
