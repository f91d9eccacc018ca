"""The training loop in process: architecture options, the progress line, the scans of
the weights."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import trainer.saving
import trainer.train
from chargpt.checkpoint import load_checkpoint, read_checkpoint
from tests.conftest import TINY_MODEL_SETTINGS
from trainer.config import TrainConfig
from trainer.progress import Progress
from trainer.setup import Run
from trainer.train import run_training

TINY = {
    **TINY_MODEL_SETTINGS,
    "max_iters": 40,
    "eval_interval": 10,
    "warmup_iters": 5,
    "learning_rate": 3e-3,
}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def train_quietly(
    data: Path, out: Path, stream: io.StringIO | None = None, **settings: Any
) -> TrainConfig:
    cfg = TrainConfig(data=str(data), out_dir=str(out), **{**TINY, **settings})
    result = run_training(cfg, Progress(cfg.max_iters, stream or io.StringIO()))
    assert result.stopped_by is None
    return cfg


@pytest.mark.parametrize(
    "options",
    [
        {"position": "rope"},
        {"norm": "rmsnorm"},
        {"activation": "relu2"},
        {"activation": "gelu"},
        {"qk_norm": True},
        {"tie_embeddings": True},
        {"bias": False},
        {"logit_softcap": 10.0},
        {"position": "rope", "attention_window": 8},  # block_size 16: two windows a sequence
        {"bigram_embedding": True},
    ],
    ids=lambda options: ",".join(f"{k}={v}" for k, v in options.items()),
)
def test_every_architecture_option_trains_and_round_trips(
    options: dict[str, Any], small_text_file: Path, tmp_path: Path
) -> None:
    cfg = train_quietly(small_text_file, tmp_path / "out", **options)
    records = [
        json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    assert records[-1]["val_loss"] < records[0]["val_loss"]  # it learns

    path = tmp_path / "out" / "model.safetensors"
    loaded = load_checkpoint(path)
    assert loaded.info.config == cfg.model_config(len(loaded.info.vocab))
    for name, value in options.items():
        assert getattr(loaded.info.config, name) == value
    stored, _ = read_checkpoint(path.read_bytes())
    rebuilt = loaded.model.state_dict()
    assert rebuilt.keys() == stored.keys()
    for name, tensor in stored.items():
        assert torch.equal(rebuilt[name], tensor), name


def test_the_progress_line_is_drawn_without_a_metrics_server(
    small_text_file: Path, tmp_path: Path
) -> None:
    terminal = Terminal()
    train_quietly(small_text_file, tmp_path / "out", terminal, max_iters=5, metrics_port=0)
    assert "\r[" in terminal.getvalue() and "| loss " in terminal.getvalue()


def test_each_save_scans_the_weights_once(
    small_text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    scanned: list[int] = []  # the step of each scan for non-finite weights
    scan = trainer.saving.require_finite_weights

    def counted(run: Run) -> None:
        scanned.append(run.state.step)
        scan(run)

    monkeypatch.setattr(trainer.saving, "require_finite_weights", counted)
    monkeypatch.setattr(trainer.train, "require_finite_weights", counted)
    train_quietly(small_text_file, tmp_path / "out", max_iters=30)
    records = [
        json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()
    ]
    assert records[0]["best"]  # it published model.safetensors too
    assert scanned == [r["step"] for r in records] == [10, 20, 30]
