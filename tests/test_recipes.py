"""Recipes: a run as long as a time budget, the schedules, Muon beside AdamW, and the
presets."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import trainer.state
import trainer.train
from chargpt.checkpoint import load_checkpoint, read_checkpoint
from chargpt.model import GPT
from tests.training import (
    chargpt,
    files_of,
    sigterm_after_step,
    train_tiny,
)
from trainer.config import TrainConfig
from trainer.optim import Muon, Optimizers, newton_schulz, orthogonalize_dtype
from trainer.presets import PRESETS, read_preset
from trainer.state import load_train_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def log_of(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_a_time_budget_ends_the_run_by_training_time(
    small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    stdout = train_tiny(
        capsys, small_text_file, out, "--time-budget=1.5", "--max-iters=1",
        "--eval-interval=1000000", "--eval-tokens=64",
    )  # fmt: skip
    (last,) = log_of(out)  # no evaluation before the end: the budget, not a step, ended it
    assert last["train_s"] >= 1.5 and last["step"] > 1  # --max-iters does not limit it
    assert last["elapsed_s"] >= last["train_s"]
    assert last["exact_val_loss"] != last["val_loss"]  # the sample, then the whole split
    info = load_checkpoint(out / "model.safetensors").info
    assert round(info.val_loss, 6) == last["exact_val_loss"]
    # (the printed figure from the unrounded loss: the log's 6-place one can round apart)
    assert f"validation loss over the whole split: {info.val_loss:.4f}" in stdout
    assert info.step == last["step"] and info.training["time_budget"] == 1.5
    assert info.training["train_s"] == last["train_s"]


def test_the_schedule_follows_the_fraction_of_the_budget_spent(
    small_text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Each step takes exactly one second of a fake clock (the run's stopwatch, on its
    # TrainState); evaluating takes none.
    clock = [0.0]
    monkeypatch.setattr(trainer.state, "time", SimpleNamespace(monotonic=lambda: clock[0]))
    real_step = trainer.train.train_step

    def step_of_one_second(*args: Any) -> torch.Tensor:
        clock[0] += 1.0
        return real_step(*args)

    monkeypatch.setattr(trainer.train, "train_step", step_of_one_second)
    out = tmp_path / "out"
    settings = {"time_budget": 20.0, "lr_schedule": "wsd", "decay_fraction": 0.5}
    train_tiny(
        capsys, small_text_file, out, "--eval-interval=1", "--warmup-iters=2",
        *(f"--{k.replace('_', '-')}={v}" for k, v in settings.items()),
    )  # fmt: skip
    records = log_of(out)
    assert [r["step"] for r in records] == list(range(1, 21))
    cfg = TrainConfig(warmup_iters=2, **settings)  # type: ignore[arg-type]
    for r in records:
        step = r["step"] - 1  # the step the learning rate was set for, 0-based
        assert r["lr"] == cfg.learning_rate_at(step, step / 20)
    lrs = [r["lr"] for r in records]
    assert lrs[1:10] == [cfg.learning_rate] * 9  # stable to half the budget
    assert lrs[10:] == sorted(lrs[10:], reverse=True) and lrs[-1] < cfg.learning_rate / 5


@pytest.mark.parametrize("schedule", ["cosine", "wsd", "constant"])
def test_schedules_end_where_they_should(schedule: str) -> None:
    cfg = TrainConfig(lr_schedule=schedule, warmup_iters=10, max_iters=110, decay_fraction=0.2)
    assert cfg.learning_rate_at(0, 0.0) == cfg.learning_rate / 10  # warmup, by steps
    assert cfg.learning_rate_at(10, 0.0) == cfg.learning_rate  # the peak after warmup
    at = {p: cfg.learning_rate_at(50, p) for p in (0.5, 0.9, 1.0)}
    if schedule == "constant":
        assert set(at.values()) == {cfg.learning_rate}
    elif schedule == "cosine":
        assert at[0.5] == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2)
        assert at[1.0] == cfg.min_lr
    else:  # the peak until the last 20%, then a straight line down to min_lr
        assert at[0.5] == cfg.learning_rate
        assert at[0.9] == pytest.approx((cfg.learning_rate + cfg.min_lr) / 2)
        assert at[1.0] == cfg.min_lr
    # By steps, the fraction of the run after warmup: today's cosine, unchanged.
    assert cfg.run_progress(60, 0.0) == 0.5


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"tie_embeddings": True},
        {"bias": False, "norm": "rmsnorm"},
        {"position": "rope"},
        {"bigram_embedding": True},
    ],
    ids=lambda o: ",".join(o) or "lecture",
)
def test_muon_and_adamw_hold_every_parameter_exactly_once(options: dict[str, Any]) -> None:
    cfg = TrainConfig(optimizer="muon", **options)
    model = GPT(cfg.model_config(vocab_size=65))
    optimizers = Optimizers(model, cfg, torch.device("cpu"))
    assert optimizers.muon is not None
    held = {
        name: [id(p) for group in opt.param_groups for p in group["params"]]
        for name, opt in optimizers.optimizers.items()
    }
    everything = sorted(held["muon"] + held["adamw"])
    assert everything == sorted(id(p) for p in model.parameters())  # each once
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[i] for i in held["muon"]}
    assert muon == {
        n for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")
    }
    assert not any("embedding" in n or "head" in n for n in muon)
    assert Optimizers(model, TrainConfig(), torch.device("cpu")).muon is None  # adamw alone


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_our_muon_is_torchs_with_newton_schulz_in_the_dtype_asked(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    weights = [torch.randn(96, 32), torch.randn(32, 128)]
    theirs = [w.clone().requires_grad_() for w in weights]
    ours = [w.clone().requires_grad_() for w in weights]
    settings = {"lr": 0.05, "weight_decay": 0.1, "adjust_lr_fn": "original"}
    reference = torch.optim.Muon(theirs, **settings)
    optimizer = Muon(ours, orthogonalize_dtype=dtype, **settings)
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params in (theirs, ours):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
        reference.step()
        optimizer.step()
    for w, a, b in zip(weights, theirs, ours, strict=True):
        if dtype == torch.bfloat16:
            assert torch.equal(a, b)  # torch's own arithmetic, step for step
        else:  # the same update, computed more exactly: apart by bfloat16's rounding only
            moved = (a - w).abs().max().item()
            assert (a - b).abs().max().item() < 0.1 * moved
    assert optimizer.state_dict()["state"].keys() == reference.state_dict()["state"].keys()
    assert orthogonalize_dtype(torch.device("cuda")) == torch.bfloat16
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert orthogonalize_dtype(torch.device("cpu")) == (torch.bfloat16 if native else torch.float32)


def test_muon_weight_decay_shrinks_the_blocks_matrices_and_survives_a_resume() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(optimizer="muon", muon_weight_decay=0.5, muon_learning_rate=0.1)
    model = GPT(cfg.model_config(vocab_size=65))
    optimizers = Optimizers(model, cfg, torch.device("cpu"))
    assert optimizers.muon is not None
    matrix = optimizers.muon.param_groups[0]["params"][0]
    before = matrix.detach().clone()
    matrix.grad = torch.zeros_like(matrix)  # no gradient: only the decay moves it
    optimizers.muon.step()
    torch.testing.assert_close(matrix.detach(), before * (1 - 0.1 * 0.5))
    # A resume takes the decay of its command line, not the one saved with the state.
    state = optimizers.state_dict()
    resumed = Optimizers(model, cfg, torch.device("cpu"))
    resumed.load_state_dict(state, TrainConfig(optimizer="muon", muon_weight_decay=0.25))
    assert resumed.muon is not None
    assert {g["weight_decay"] for g in resumed.muon.param_groups} == {0.25}


def test_muon_ns_steps_sets_the_iterations_of_each_step_and_survives_a_resume() -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(optimizer="muon", muon_ns_steps=2, muon_learning_rate=0.1)
    model = GPT(cfg.model_config(vocab_size=65))
    optimizers = Optimizers(model, cfg, torch.device("cpu"))
    assert optimizers.muon is not None
    group = optimizers.muon.param_groups[0]
    matrix = group["params"][0]  # blocks.0.attn.qkv.weight, (3C, C)
    before, grad = matrix.detach().clone(), torch.randn_like(matrix)
    matrix.grad = grad
    optimizers.muon.step()
    # From zero momentum the Nesterov update is (1 - m) g + m (1 - m) g; two iterations.
    m = group["momentum"]
    nesterov = (grad * (1 - m) * (1 + m)).to(optimizers.muon.orthogonalize_dtype)
    coefficients, eps = group["ns_coefficients"], group["eps"]
    update = newton_schulz(nesterov, coefficients, 2, eps).float()
    rows, cols = matrix.shape
    expected = before - 0.1 * (rows / cols) ** 0.5 * update
    torch.testing.assert_close(matrix.detach(), expected)
    three = newton_schulz(nesterov, coefficients, 3, eps).float()
    assert not torch.allclose(update, three, atol=1e-3)  # the count matters
    resumed = Optimizers(model, cfg, torch.device("cpu"))
    resumed.load_state_dict(optimizers.state_dict(), TrainConfig(optimizer="muon"))
    assert resumed.muon is not None
    assert {g["ns_steps"] for g in resumed.muon.param_groups} == {5}


def test_resume_with_muon_is_exact(
    small_text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    muon = ["--optimizer=muon", "--muon-learning-rate=0.05", "--muon-weight-decay=0.5",
            "--muon-ns-steps=3", "--lr-schedule=wsd", "--max-iters=8",
            "--bigram-embedding"]  # fmt: skip
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train_tiny(capsys, small_text_file, straight, *muon)
    sigterm_after_step(monkeypatch, 3)
    train_tiny(capsys, small_text_file, stopped, *muon)
    monkeypatch.undo()
    assert load_checkpoint(stopped / "latest.safetensors").info.step == 3
    code, _, err = chargpt(capsys, "train", "--out-dir", str(stopped), "--resume")
    assert code == 0, err
    a = read_checkpoint((straight / "latest.safetensors").read_bytes())[0]
    b = read_checkpoint((stopped / "latest.safetensors").read_bytes())[0]
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert set(load_train_state(stopped / "resume.pt").optimizers) == {"adamw", "muon"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_loads_and_trains(
    preset: str, small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, _, err = chargpt(
        capsys, "train", "--preset", preset, "--data", str(small_text_file), "--out-dir",
        str(out), "--max-iters=2", "--time-budget=0", "--batch-size=2", "--eval-tokens=256",
        "--eval-interval=2", "--sample-length=0", "--device=cpu",
    )  # fmt: skip
    assert code == 0, err
    training = load_checkpoint(out / "model.safetensors").info.training
    assert training["preset"] == preset
    overridden = {"max_iters", "time_budget", "batch_size", "eval_tokens", "eval_interval"}
    for name, value in read_preset(preset).items():
        if name not in overridden | {"sample_length", "device"}:
            assert training[name] == value, name


def test_the_lecture_preset_is_the_defaults() -> None:
    assert read_preset("lecture") == {}  # a bare `chargpt train` trains as it always did
    assert TrainConfig().preset == "lecture"


def test_flags_the_environment_and_a_config_file_override_a_preset(
    small_text_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    preset = read_preset("cpu-100s")
    config = tmp_path / "run.toml"
    config.write_text('activation = "gelu"\n')
    monkeypatch.setenv("CHARGPT_N_HEAD", "2")
    out = tmp_path / "out"
    code, _, err = chargpt(
        capsys, "train", "--preset=cpu-100s", "--config", str(config), "--data",
        str(small_text_file), "--out-dir", str(out), "--n-embd=32", "--time-budget=0",
        "--max-iters=1", "--eval-tokens=64", "--sample-length=0",
    )  # fmt: skip
    assert code == 0, err
    training = load_checkpoint(out / "model.safetensors").info.training
    assert (training["n_embd"], training["n_head"], training["activation"]) == (32, 2, "gelu")
    kept = set(preset) - {"n_embd", "n_head", "activation", "time_budget", "eval_tokens"}
    assert kept and all(training[name] == preset[name] for name in kept)


def test_bad_recipe_input_is_one_line_exit_2_and_writes_nothing(
    small_text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    train_tiny(capsys, small_text_file, run, "--max-iters=2")
    before = files_of(run)
    cases = [
        (["--time-budget=-1"], "'--time-budget': -1.0 is not in the range x>=0"),
        (["--preset=cpu-1h"], "is not one of 'lecture', 'cpu-100s', 'cpu-10min', 'gpu-shakespeare'"),
        (["--optimizer=muon", "--muon-learning-rate=0"], "'--muon-learning-rate': 0.0 is not in the range x>0"),
        (["--optimizer=muon", "--muon-weight-decay=-1"], "'--muon-weight-decay': -1.0 is not in the range x>=0"),
        (["--out-dir", str(run), "--resume", "--preset=cpu-100s"], "n_layer=1 there, 4 here"),
        (["--out-dir", str(run), "--resume", "--optimizer=muon"], "optimizer=adamw there, muon here"),
    ]  # fmt: skip
    for args, expected in cases:
        code, _, err = chargpt(capsys, "train", "--data", str(small_text_file), *args)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("Error: ") and expected in err, err
    assert files_of(run) == before
    assert not (Path.cwd() / "out").exists()
