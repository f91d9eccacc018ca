"""Everything a training run can be told, with the seed's defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


class ConfigError(ValueError):
    """A setting is out of range or contradicts another."""


@dataclass(frozen=True)
class TrainConfig:
    # Data and outputs.
    data: str | None = None
    data_dir: str = "data"
    out_dir: str = "out"
    run_name: str = ""
    # The seed's hyperparameters.
    batch_size: int = 16
    block_size: int = 32
    max_iters: int = 5000
    learning_rate: float = 1e-3
    eval_interval: int = 100
    n_embd: int = 64
    n_head: int = 4
    n_layer: int = 8
    dropout: float = 0.0
    # Optimisation.
    seed: int = 1337
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    lr_schedule: str = "cosine"
    warmup_iters: int = 100
    min_lr: float = 1e-4
    # Evaluation.
    eval_batch_size: int = 64
    eval_tokens: int = 0
    # Execution.
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    metrics_port: int = 0
    sample_length: int = 300
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        positive = (
            "batch_size", "block_size", "max_iters", "eval_interval", "n_embd", "n_head",
            "n_layer", "eval_batch_size",
        )  # fmt: skip
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("learning_rate",):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("weight_decay", "grad_clip", "min_lr", "warmup_iters", "eval_tokens",
                     "sample_length"):  # fmt: skip
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ConfigError(f"lr_schedule must be cosine or constant, got {self.lr_schedule!r}")
        if self.min_lr > self.learning_rate:
            raise ConfigError(
                f"min_lr ({self.min_lr}) must not exceed learning_rate ({self.learning_rate})"
            )
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be a TCP port (0 = off), got {self.metrics_port}")
        if self.resume and self.overwrite:
            raise ConfigError("resume and overwrite contradict each other; pick one")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def learning_rate_at(self, step: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based): linear warmup, then
        cosine decay to ``min_lr`` at ``max_iters`` (or constant after warmup)."""
        if step < self.warmup_iters:
            return self.learning_rate * (step + 1) / self.warmup_iters
        if self.lr_schedule == "constant":
            return self.learning_rate
        progress = min(1.0, (step - self.warmup_iters) / max(1, self.max_iters - self.warmup_iters))
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (
            self.learning_rate - self.min_lr
        )
