"""What the in-process ``chargpt train`` tests share: a tiny model's flags, the command run
in this process, a run directory's files, no ``CHARGPT_*`` settings from the environment
(an autouse fixture wherever it is imported), and a SIGTERM after a given step."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.train
from chargpt.cli import main
from tests.conftest import REPO, TINY_MODEL, chargpt_env, flags, run_process

# The smallest run, for tests of the trainer's mechanics (faults, guards, resume), not
# of what it learns: TrainConfig settings, and the same as flags.
TINY_SETTINGS: dict[str, Any] = {
    "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "batch_size": 4,
    "eval_batch_size": 64, "sample_length": 0, "eval_interval": 2, "warmup_iters": 2,
    "device": "cpu",
}  # fmt: skip


TINY = flags(TINY_SETTINGS)


def chargpt(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The exit code, stdout and stderr of ``chargpt ARGS``, run in this process."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exited.value.code or 0), out, err


def train_tiny(capsys: pytest.CaptureFixture[str], data: Path, out: Path, *args: str) -> str:
    """``chargpt train`` of the TINY run in process; its stdout (it must succeed)."""
    code, stdout, err = chargpt(
        capsys, "train", "--data", str(data), "--out-dir", str(out), *TINY, *args
    )
    assert code == 0, err
    return stdout


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def strict_json_lines(path: Path) -> list[dict[str, Any]]:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def sigterm_after_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """The next run in this process gets SIGTERM (its own handler: stop after this step)
    right after optimizer step ``step``; ``monkeypatch.undo()`` ends it."""
    steps = 0
    train_step = trainer.train.train_step

    def train_step_then_signal(*args: Any) -> torch.Tensor:
        nonlocal steps
        loss = train_step(*args)
        steps += 1
        if steps == step:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(trainer.train, "train_step", train_step_then_signal)


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out-dir", str(out), *TINY_MODEL, *extra]


needs_torchrun = pytest.mark.skipif(
    shutil.which("torchrun") is None, reason="torchrun not installed"
)
DDP_ARGS = ["--max-iters", "30", "--eval-interval", "15", "--device", "cpu"]


def torchrun(*command: str) -> subprocess.CompletedProcess[str]:
    """``command`` (a module and its arguments) in two CPU processes under torchrun."""
    return run_process(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", *command], chargpt_env(),
        cwd=REPO,
    )  # fmt: skip
