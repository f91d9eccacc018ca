"""``--resume`` takes the run's own settings, applies the changes it allows for real and
refuses the others by name; gradient accumulation trains like the larger batch and resumes
exactly."""

from __future__ import annotations

import io
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from chargpt.checkpoint import load_checkpoint, read_checkpoint
from tests.training import (
    DDP_ARGS,
    TINY,
    chargpt,
    files_of,
    needs_torchrun,
    sigterm_after_step,
    torchrun,
    train_args,
)
from trainer.config import TrainConfig
from trainer.progress import Progress
from trainer.train import run_training

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONSTANT = [*TINY, "--lr-schedule=constant"]  # a longer run steps like the shorter one


def weights(out: Path, name: str = "latest.safetensors") -> dict[str, torch.Tensor]:
    return read_checkpoint((out / name).read_bytes())[0]


@pytest.fixture
def four_steps(small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "four"
    code, _, err = chargpt(
        capsys, "train", "--data", str(small_text_file), "--out-dir", str(out), *CONSTANT,
        "--max-iters=4",
    )  # fmt: skip
    assert code == 0, err
    return out


def test_resume_takes_the_runs_own_settings_and_a_longer_run_ends_like_a_straight_one(
    four_steps: Path, small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Neither the data nor the architecture is repeated; a value equal to the run's is fine.
    code, out, err = chargpt(
        capsys, "train", "--out-dir", str(four_steps), "--resume", "--max-iters=6", "--n-layer=1"
    )
    assert code == 0, err
    assert "resuming at step 4" in out and "resumed with max_iters 6 (was 4)" in out
    straight = tmp_path / "straight"
    code, _, err = chargpt(
        capsys, "train", "--data", str(small_text_file), "--out-dir", str(straight), *CONSTANT,
        "--max-iters=6",
    )  # fmt: skip
    assert code == 0, err
    a, b = weights(straight), weights(four_steps)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    info = load_checkpoint(four_steps / "latest.safetensors").info
    assert info.training["max_iters"] == 6
    assert info.training["changed_on_resume"] == [{"step": 4, "settings": {"max_iters": [4, 6]}}]


def test_a_run_moved_elsewhere_resumes_where_it_is(
    four_steps: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    four_steps.rename(moved / "out")
    monkeypatch.chdir(moved)
    code, _, err = chargpt(capsys, "train", "--resume", "--max-iters=6")  # --out-dir out
    assert code == 0, err
    assert not four_steps.exists()
    assert load_checkpoint(moved / "out" / "latest.safetensors").info.step == 6


def test_a_changed_weight_decay_is_applied_for_real_and_recorded(
    four_steps: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    same = tmp_path / "same"
    shutil.copytree(four_steps, same)
    for out, extra in ((same, []), (four_steps, ["--weight-decay=5"])):
        code, _, err = chargpt(
            capsys, "train", "--out-dir", str(out), "--resume", "--max-iters=6", *extra
        )
        assert code == 0, err
    kept, decayed = weights(same), weights(four_steps)
    # Before, the optimizer's saved parameter groups won: both trained alike.
    assert not torch.equal(decayed["blocks.0.ffwd.fc.weight"], kept["blocks.0.ffwd.fc.weight"])
    info = load_checkpoint(four_steps / "latest.safetensors").info
    assert info.training["weight_decay"] == 5.0
    assert info.training["changed_on_resume"] == [
        {"step": 4, "settings": {"max_iters": [4, 6], "weight_decay": [0.01, 5.0]}}
    ]


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--batch-size=3"], "batch_size=4 there, 3 here"),
        (["--grad-accum-steps=2"], "grad_accum_steps=1 there, 2 here"),
        (["--seed=7"], "seed=1337 there, 7 here"),
        (
            ["--n-layer=2", "--block-size=16"],
            "block_size=8 there, 16 here; n_layer=1 there, 2 here",
        ),
    ],
)
def test_resume_refuses_to_change_the_runs_own_settings_by_name(
    args: list[str], named: str, four_steps: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files_of(four_steps)
    code, _, err = chargpt(capsys, "train", "--out-dir", str(four_steps), "--resume", *args)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert named in err, err
    assert files_of(four_steps) == before


def train_in_process(data: Path, out: Path, **settings: Any) -> None:
    tiny = {
        "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "eval_batch_size": 64,
        "sample_length": 0, "eval_interval": 2, "warmup_iters": 2, "max_iters": 6,
        "device": "cpu", "learning_rate": 3e-3,
    }  # fmt: skip
    cfg = TrainConfig(data=str(data), out_dir=str(out), **{**tiny, **settings})
    run_training(cfg, Progress(cfg.max_iters, io.StringIO()))


def test_two_micro_batches_train_like_one_batch_twice_as_large(
    small_text_file: Path, tmp_path: Path
) -> None:
    train_in_process(small_text_file, tmp_path / "one", batch_size=8)
    train_in_process(small_text_file, tmp_path / "two", batch_size=4, grad_accum_steps=2)
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
    logs = [(tmp_path / d / "log.jsonl").read_text().splitlines() for d in ("one", "two")]
    assert [line.split('"tokens": ')[1].split(",")[0] for line in logs[1]] == [
        str(step * 2 * 4 * 8)
        for step in (2, 4, 6)  # steps x micro-batches x batch x block
    ]


def test_a_run_with_micro_batches_stopped_mid_run_resumes_exactly(
    small_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = {"batch_size": 4, "grad_accum_steps": 2, "dropout": 0.1}
    train_in_process(small_text_file, tmp_path / "straight", **settings)

    sigterm_after_step(monkeypatch, 3)
    train_in_process(small_text_file, tmp_path / "stopped", **settings)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "stopped" / "latest.safetensors").info.step == 3
    train_in_process(small_text_file, tmp_path / "stopped", **settings, resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "stopped")
    for name in a:
        assert torch.equal(a[name], b[name]), name


@needs_torchrun
def test_micro_batches_under_ddp_train_like_one_process_with_the_whole_batch(
    small_text_file: Path, tmp_path: Path
) -> None:
    # 2 ranks x 2 micro-batches x 2 sequences = one process with batch 8 (TINY_MODEL's).
    ddp = tmp_path / "ddp"
    args = [*DDP_ARGS, "--batch-size", "2", "--grad-accum-steps", "2"]
    result = torchrun("chargpt", *train_args(small_text_file, ddp, *args))
    assert result.returncode == 0, result.stderr[-3000:]
    single = tmp_path / "single"
    train_whole_batch(small_text_file, single)
    one, two = weights(single), weights(ddp)
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5, msg=name)


def train_whole_batch(data: Path, out: Path) -> None:
    """The same run in this process, with the whole batch of 8."""
    cfg = TrainConfig(
        data=str(data), out_dir=str(out), n_layer=2, n_head=2, n_embd=32, block_size=16,
        batch_size=8, eval_batch_size=32, sample_length=0, max_iters=30, eval_interval=15,
        device="cpu",
    )  # fmt: skip
    run_training(cfg, Progress(cfg.max_iters, io.StringIO()))
