"""What a run shows and records as it goes: the console, Prometheus metrics and
``log.jsonl`` (strict JSON: a non-finite number is never written). Only rank 0 reports;
on the other ranks a ``Report`` does nothing."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from trainer.metrics import TrainerMetrics
from trainer.progress import Progress, format_duration, format_rate
from trainer.state import append_line


class Throughput:
    """Training tokens per second since the last restart (each evaluation restarts it, so
    that evaluation time does not count). A step's tokens are those of all its
    micro-batches on all ranks."""

    def __init__(self, tokens_per_step: int) -> None:
        self.tokens_per_step = tokens_per_step
        self.restart()

    def restart(self) -> None:
        self.started, self.tokens = time.monotonic(), 0

    def step(self) -> None:
        self.tokens += self.tokens_per_step

    def rate(self) -> float:
        return self.tokens / max(time.monotonic() - self.started, 1e-9)

    def eta(self, steps_left: int) -> float:
        return steps_left * self.tokens_per_step / max(self.rate(), 1e-9)


@dataclass(frozen=True)
class Evaluation:
    """One evaluation, as logged and shown."""

    step: int
    train_loss: float
    val_loss: float
    exact_val_loss: float | None  # at the end of a budgeted run: the whole validation split
    improved: bool  # a new best validation loss: model.safetensors was published
    lr: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    train_s: float  # of elapsed_s, in training steps
    eta_s: float

    def record(self) -> dict[str, object]:
        """The line of ``log.jsonl``."""
        return {
            "step": self.step,
            "train_loss": round(self.train_loss, 6),
            "val_loss": round(self.val_loss, 6),
            **(
                {}
                if self.exact_val_loss is None
                else {"exact_val_loss": round(self.exact_val_loss, 6)}
            ),
            "best": self.improved,
            "lr": self.lr,
            "tokens": self.tokens,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "elapsed_s": round(self.elapsed_s, 3),
            "train_s": round(self.train_s, 3),
            "time": datetime.now(UTC).isoformat(timespec="seconds"),
        }


class Report:
    """Rank 0's console, metrics and log (``enabled``); nothing on the other ranks.

    The batch loss is read (which waits for the device) every ``loss_interval`` steps.
    """

    def __init__(
        self,
        enabled: bool,
        progress: Progress,
        metrics: TrainerMetrics,
        log: Path,
        loss_interval: int = 1,
    ) -> None:
        self.enabled = enabled
        self.progress = progress
        self.metrics = metrics
        self.log = log
        self.loss_interval = loss_interval

    def line(self, text: str) -> None:
        if self.enabled:
            self.progress.log(text)

    def step(
        self,
        step: int,
        lr: float,
        loss: torch.Tensor,
        meter: Throughput,
        fraction: float,
        eta_s: float,
    ) -> None:
        """After each optimizer step; ``fraction`` of the run done, ``eta_s`` left."""
        if not self.enabled:
            return
        self.metrics.step.set(step)
        self.metrics.tokens.inc(meter.tokens_per_step)
        self.metrics.learning_rate.set(lr)
        if step % self.loss_interval == 0:
            loss_value = loss.item()
            self.metrics.batch_loss.set(loss_value)
            self.progress.update(step, fraction, loss_value, meter.rate(), eta_s)

    def evaluation(self, ev: Evaluation, best_val_loss: float) -> None:
        if not self.enabled:
            return
        append_line(self.log, json.dumps(ev.record(), allow_nan=False))
        self.metrics.loss.labels("train").set(ev.train_loss)
        self.metrics.loss.labels("val").set(ev.val_loss)
        self.metrics.best_val_loss.set(best_val_loss)
        self.progress.log(
            f"{self.progress.step_text(ev.step)} | train {ev.train_loss:.4f} | "
            f"val {ev.val_loss:.4f}{' *' if ev.improved else '  '} | lr {ev.lr:.2e} | "
            f"{format_rate(ev.tokens_per_s)} | {format_duration(ev.elapsed_s)} elapsed, "
            f"ETA {format_duration(ev.eta_s)}"
        )

    def published(self, kind: str) -> None:
        """A checkpoint file landed: ``best`` (model.safetensors) or ``latest``."""
        if self.enabled:
            self.metrics.checkpoints.labels(kind).inc()

    def close(self) -> None:
        self.metrics.close()
