"""The trainer under faults: a crash or a full disk at every point of the save sequence,
I/O errors, a directory removed under the run. After each, ``--resume`` must continue and
end bit-identical (weights, and the log's step and validation loss) to a run that was
never interrupted.

Most runs are in process, with a tiny model. A crash at a save point is the run directory
as it is at that point: the recording run copies it there (``crash_images``), which is
exactly what a SIGKILL leaves (a killed process's written data is in the kernel's page
cache; only a power loss would lose what was not fsynced). Two points are also killed for
real, with SIGKILL, in a subprocess (``tests/fault_at.py``).
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from chargpt.checkpoint import read_checkpoint
from tests.conftest import REPO, chargpt_env, flags, run_process
from tests.training import TINY_SETTINGS
from trainer.config import TrainConfig
from trainer.errors import RunError
from trainer.progress import Progress
from trainer.train import run_training

TINY: dict[str, Any] = {**TINY_SETTINGS, "max_iters": 6, "learning_rate": 3e-3}
TINY_FLAGS = flags(TINY)

# One evaluation that finds a new best writes these files in this order (trainer/train.py);
# each point is just before a step of writing the file (trainer.state.save_point).
PUBLISH = ("create", "write", "sync", "rename", "sync-dir")
SAVE_SEQUENCE = [
    *(("model.safetensors", step) for step in PUBLISH),
    *(("log.jsonl", step) for step in ("open", "write", "sync")),
    *(("resume.pt", step) for step in PUBLISH),
    *(("latest.safetensors", step) for step in PUBLISH),
]
POINT_IDS = [f"{file}:{step}" for file, step in SAVE_SEQUENCE]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(data: Path, out: Path, **settings: Any) -> TrainConfig:
    return TrainConfig(data=str(data), out_dir=str(out), **{**TINY, **settings})


def train(cfg: TrainConfig) -> None:
    result = run_training(cfg, Progress(cfg.max_iters, io.StringIO()))
    assert result.stopped_by is None


def weights(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint((out / "latest.safetensors").read_bytes())[0]


def logged(out: Path) -> list[tuple[int, float]]:
    lines = (out / "log.jsonl").read_text().splitlines()
    return [(r["step"], r["val_loss"]) for r in map(json.loads, lines)]


def assert_same_end(out: Path, straight: Path) -> None:
    """``out`` ended where ``straight`` did: the same weights, bit for bit, the same log
    (step, validation loss) and nothing left over from an interrupted save."""
    a, b = weights(straight), weights(out)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert logged(out) == logged(straight)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in straight.iterdir())


@dataclass
class Recorded:
    out: Path  # the uninterrupted run
    points: list[tuple[str, str]]  # every save point it passed, in order
    images: dict[tuple[str, str], Path]  # the run directory at each point of the 2nd evaluation


@pytest.fixture(scope="module")
def recorded(small_text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Recorded:
    """An uninterrupted run that copies its directory at every save point of its second
    evaluation (step 4): what a crash there would leave."""
    root = tmp_path_factory.mktemp("recorded")
    points: list[tuple[str, str]] = []
    images: dict[tuple[str, str], Path] = {}

    def crash_image(path: Path, step: str) -> None:
        points.append((path.name, step))
        if len(SAVE_SEQUENCE) < len(points) <= 2 * len(SAVE_SEQUENCE):
            images[points[-1]] = root / f"image-{len(points)}"
            shutil.copytree(path.parent, images[points[-1]])

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("trainer.state.save_point", crash_image)
        train(config(small_text_file, root / "out"))
    return Recorded(root / "out", points, images)


def test_the_crash_tests_cover_every_point_of_the_save_sequence(recorded: Recorded) -> None:
    # Three evaluations (steps 2, 4, 6), each a new best: the sequence the tests below cut.
    assert recorded.points == SAVE_SEQUENCE * 3
    assert len(recorded.images) == len(SAVE_SEQUENCE)


@pytest.mark.parametrize("point", SAVE_SEQUENCE, ids=POINT_IDS)
def test_a_crash_at_any_save_point_resumes_to_the_same_end(
    point: tuple[str, str], recorded: Recorded, small_text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(recorded.images[point], out)
    train(config(small_text_file, out, resume=True))
    assert_same_end(out, recorded.out)


def test_a_torn_log_line_is_dropped_and_written_again(
    recorded: Recorded, small_text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    shutil.copytree(recorded.images[("log.jsonl", "sync")], out)
    log = (out / "log.jsonl").read_bytes()
    (out / "log.jsonl").write_bytes(log[: len(log) - 20])  # the crash cut the line short
    train(config(small_text_file, out, resume=True))
    assert_same_end(out, recorded.out)


def fail_at(
    monkeypatch: pytest.MonkeyPatch, point: tuple[str, str], nth: int, error: OSError
) -> None:
    """Make the ``nth`` pass through save point ``point`` raise ``error``."""
    passes = 0

    def fail(path: Path, step: str) -> None:
        nonlocal passes
        passes += (path.name, step) == point
        if (path.name, step) == point and passes == nth:
            raise error

    monkeypatch.setattr("trainer.state.save_point", fail)


@pytest.mark.parametrize("point", SAVE_SEQUENCE, ids=POINT_IDS)
def test_a_full_disk_at_any_save_point_is_one_error_and_resumes_to_the_same_end(
    point: tuple[str, str],
    recorded: Recorded,
    small_text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "out"
    fail_at(monkeypatch, point, 2, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    with pytest.raises(RunError) as failed:
        train(config(small_text_file, out))
    intact = 4 if point[0] == "latest.safetensors" else 2  # resume.pt is the checkpoint
    assert str(failed.value) == (
        f"cannot write {out / point[0]}: No space left on device; the checkpoint of step "
        f"{intact} is intact: free space and run again with --resume"
    )
    monkeypatch.undo()  # space freed
    train(config(small_text_file, out, resume=True))
    assert_same_end(out, recorded.out)


def test_an_io_error_says_what_is_intact_and_the_run_resumes(
    recorded: Recorded, small_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    fail_at(monkeypatch, ("resume.pt", "sync"), 2, OSError(errno.EIO, os.strerror(errno.EIO)))
    with pytest.raises(RunError, match="the checkpoint of step 2 is intact: check the disk"):
        train(config(small_text_file, out))
    monkeypatch.undo()
    train(config(small_text_file, out, resume=True))
    assert_same_end(out, recorded.out)


def test_a_run_directory_removed_under_the_run_is_one_error(
    small_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"

    def remove_the_run(path: Path, step: str) -> None:
        if (path.name, step) == ("log.jsonl", "open") and out.exists():
            shutil.rmtree(out)

    monkeypatch.setattr("trainer.state.save_point", remove_the_run)
    with pytest.raises(RunError) as failed:
        train(config(small_text_file, out))
    assert str(failed.value) == (
        f"cannot write {out / 'log.jsonl'}: No such file or directory (the run directory "
        f"{out} is gone): nothing is left to resume; train again"
    )


def run_with_fault(
    point: tuple[str, str], nth: int, action: str, data: Path, out: Path
) -> subprocess.CompletedProcess[str]:
    """The real ``chargpt train`` with ``action`` at the ``nth`` pass through ``point``."""
    command = [sys.executable, "-m", "tests.fault_at", *point, str(nth), action]
    return run_process(
        [*command, "train", "--data", str(data), "--out-dir", str(out), *TINY_FLAGS],
        chargpt_env({"OMP_NUM_THREADS": "1"}), cwd=REPO,
    )  # fmt: skip


@pytest.mark.parametrize(
    "point",
    [("resume.pt", "rename"), ("latest.safetensors", "create")],  # around the checkpoint
    ids=["before resume.pt lands", "after resume.pt landed"],
)
def test_sigkill_at_a_save_point_then_resume_ends_the_same(
    point: tuple[str, str], recorded: Recorded, small_text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    killed = run_with_fault(point, 2, "kill", small_text_file, out)
    assert killed.returncode == -9, killed.stderr
    assert any(p.name.endswith(".tmp") for p in out.iterdir()) == (point[1] == "rename")
    train(config(small_text_file, out, resume=True))
    assert_same_end(out, recorded.out)


def test_a_full_disk_is_one_error_line_exit_3_without_a_traceback(
    small_text_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    failed = run_with_fault(("log.jsonl", "write"), 3, "ENOSPC", small_text_file, out)
    assert failed.returncode == 3, failed.stderr
    assert failed.stderr.splitlines() == [
        f"Error: cannot write {out / 'log.jsonl'}: No space left on device; the checkpoint "
        f"of step 4 is intact: free space and run again with --resume"
    ]
    assert "checkpoint:" not in failed.stdout


@contextlib.contextmanager
def tmpfs(path: Path, size: int) -> Iterator[None]:
    """A tmpfs of ``size`` bytes mounted at ``path`` (skips the test where mounting is not
    permitted)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_a_disk_that_really_fills_then_grows_resumes_to_the_same_end(
    recorded: Recorded, small_text_file: Path, tmp_path: Path
) -> None:
    # Room for the files of one evaluation, not for the next one's new best model beside them.
    page = 4096
    files = [p.stat().st_size for p in recorded.out.iterdir()]
    size = (sum(-(-n // page) for n in files) + 2) * page
    disk = tmp_path / "disk"
    with tmpfs(disk, size):
        out = disk / "out"
        with pytest.raises(RunError) as failed:
            train(config(small_text_file, out))
        assert str(failed.value) == (
            f"cannot write {out / 'model.safetensors'}: No space left on device; the checkpoint "
            f"of step 2 is intact: free space and run again with --resume"
        )
        subprocess.run(["mount", "-o", "remount,size=16m", str(disk)], check=True)
        train(config(small_text_file, out, resume=True))
        assert_same_end(out, recorded.out)
