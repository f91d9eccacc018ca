"""Shared fixtures: small texts, tiny trained checkpoints, running the real CLI."""

from __future__ import annotations

import contextlib
import os
import random
import shlex
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from chargpt.model import GPT, GPTConfig

# Before anything imports torch, and inherited by every process a test starts: OpenMP
# threads that sleep at barriers instead of spinning (see chargpt.cli.calm_openmp), so
# that the suite keeps its speed on a busy machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
REPO = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = Path(
    os.environ.get(
        "CHARGPT_TINY_SHAKESPEARE", REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
    )
)
# A model small enough to train in seconds on two CPU cores, and still learn something:
# TrainConfig settings, and the same as ``chargpt train`` flags.
TINY_MODEL_SETTINGS: dict[str, Any] = {
    "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 16, "batch_size": 8,
    "eval_batch_size": 32, "sample_length": 0,
}  # fmt: skip


def flags(settings: dict[str, Any]) -> list[str]:
    """``{"n_layer": 1}`` as ``["--n-layer=1"]``."""
    return [f"--{name.replace('_', '-')}={value}" for name, value in settings.items()]


TINY_MODEL = flags(TINY_MODEL_SETTINGS)


def sharp_model(config: GPTConfig) -> GPT:
    """A ``chargpt.model.GPT`` of ``config`` with N(0, 0.5) weights (seeded): sharp
    distributions, so that greedy text has no near-ties between faster paths and the
    reference."""
    import torch

    from chargpt.model import GPT

    torch.manual_seed(0)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def make_text(n_chars: int = 20_000, seed: int = 0) -> str:
    """Pseudo-English with some structure, so a tiny model can learn something."""
    rng = random.Random(seed)
    words = [
        *("the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and"),
        *("then", "sleeps", "while", "romeo", "sings", "to", "juliet", "under", "her"),
        *("balcony", "at", "night"),
    ]
    lines = []
    while sum(map(len, lines)) < n_chars:
        name = rng.choice(["ROMEO", "JULIET", "NURSE"])
        line = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
        lines.append(f"{name}:\n{line.capitalize()}.\n\n")
    return "".join(lines)[:n_chars]


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Train on one thread in process, as subprocesses do (``run_chargpt`` sets
    OMP_NUM_THREADS=1): results are bit-identical only for the same thread count, and for
    tiny models two threads on a busy machine are many times slower than one."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def small_text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "small.txt"
    path.write_text(make_text())
    return path


def run_process(
    command: Sequence[str | Path],
    env: dict[str, str] | None = None,
    timeout: float = 300,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``command`` run to its end, its output captured. Past ``timeout``, it and every
    process it started are killed (torchrun's ranks too, which run in sessions of their
    own) and the test fails with what they printed, instead of hanging; whatever it leaves
    running when it ends is killed too."""
    args = [str(a) for a in command]
    tag = uuid.uuid4().hex  # inherited by every process it starts: how to find them
    env = {**(os.environ if env is None else env), PROCESS_TAG: tag}
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tagged(tag)
        stdout, stderr = proc.communicate()
        pytest.fail(
            f"{shlex.join(args)} did not finish within {timeout:g} s and was killed with "
            f"everything it started.\n--- its stdout (end) ---\n{stdout[-4000:]}\n"
            f"--- its stderr (end) ---\n{stderr[-4000:]}",
            pytrace=False,
        )
    finally:
        kill_tagged(tag)
    return subprocess.CompletedProcess(args, proc.returncode, stdout, stderr)


PROCESS_TAG = "PYTEST_CHARGPT_PROCESS_TAG"


def kill_tagged(tag: str) -> None:
    """SIGKILL every process whose environment carries ``PROCESS_TAG=tag`` (Linux /proc)."""
    marker = f"{PROCESS_TAG}={tag}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # gone, or not ours to read
                if marker in (entry / "environ").read_bytes().split(b"\0"):
                    os.kill(int(entry.name), signal.SIGKILL)


def without_settings() -> dict[str, str]:
    """This process's environment without its ``CHARGPT_*`` settings: what a command a test
    starts would otherwise read as flags (click's ``auto_envvar_prefix``)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CHARGPT_")}


@pytest.fixture(autouse=True)
def no_settings_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test, in process too, sees no ``CHARGPT_*`` setting it did not set itself."""
    for name in list(os.environ):
        if name.startswith("CHARGPT_"):
            monkeypatch.delenv(name)


def chargpt_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without its ``CHARGPT_*`` settings, one OpenMP thread (tiny models:
    two threads on a busy machine are slower), then ``env``."""
    full_env = without_settings()
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env.update(env or {})
    return full_env


def run_chargpt(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the real ``chargpt`` command line in a subprocess."""
    return run_process([sys.executable, "-m", "chargpt", *args], chargpt_env(env), timeout, cwd)


@pytest.fixture(scope="session")
def windowed_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A rotary model with a sliding attention window (and the other options), random
    weights large enough that its logits are far from uniform: for serving equivalence."""
    import torch

    from chargpt.checkpoint import CheckpointInfo, save_checkpoint
    from chargpt.model import GPT, GPTConfig
    from chargpt.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(make_text())
    config = GPTConfig(
        vocab_size=tokenizer.vocab_size, block_size=32, n_embd=32, n_head=2, n_layer=2,
        position="rope", attention_window=12, norm="rmsnorm", activation="relu2",
        qk_norm=True, bias=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("windowed") / "model.safetensors"
    info = CheckpointInfo(config, tokenizer.vocab, 1, None, None, "00" * 32, "windowed-random")
    save_checkpoint(path, model, info)
    return path


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, small_text_file: Path) -> Path:
    """Run directory of a tiny model trained for 60 steps on the small text."""
    out = tmp_path_factory.mktemp("run")
    result = run_chargpt(
        "train", "--data", str(small_text_file), "--out-dir", str(out),
        "--max-iters", "60", "--eval-interval", "20", *TINY_MODEL,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return out
