"""The training loop: one process, or one of several under ``torchrun`` (DDP).

``run_training`` sets a run up (``trainer/setup.py``: device and precision, the run
directory, the corpus, the model and optimizer, the state to resume), then ``train`` runs
the loop for ``max_iters`` steps or ``time_budget`` seconds of training (``RunLength``),
calling ``evaluate_and_checkpoint`` every ``eval_interval`` steps and at the end.

What a run writes to ``out_dir`` (rank 0 only; ``trainer/state.py`` has the files,
``trainer/saving.py`` writes the checkpoint), in this order at each evaluation:

1. ``model.safetensors``, on a new best validation loss: the file the server loads.
2. A line of ``log.jsonl``.
3. ``resume.pt``: the ``TrainState``, latest weights included, that continues the run
   exactly. A checkpoint is complete when this file lands.
4. ``latest.safetensors``: the latest weights in the served format.

Each file is replaced atomically, so a crash or a full disk at any point leaves the
previous ``resume.pt`` or the next one. The next start removes what a crash left behind
(temporary files; log lines newer than the state it resumes from, written again when their
evaluation is). Nothing non-finite is ever saved: a non-finite loss stops the run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from chargpt.checkpoint import load_checkpoint
from chargpt.model import reference_generate
from chargpt.runtime import resolve_device
from chargpt.sampling import SamplingParams
from trainer.batches import Batches
from trainer.config import TrainConfig
from trainer.distributed import Distributed
from trainer.errors import RunError, SetupError, WriteError, diverged, failed_write
from trainer.optim import Optimizers
from trainer.progress import Progress
from trainer.report import Evaluation, Throughput
from trainer.saving import publish_weights, require_finite_weights, save_latest
from trainer.setup import Run, removed_if_unused, setup
from trainer.signals import LateSignalError, StopSignals
from trainer.state import TrainState

__all__ = ["RunError", "SetupError", "TrainResult", "run_training"]


def run_training(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train per ``cfg``. Raises SetupError (or DataError) before writing anything when an
    input is unusable, RunError (DivergedError) when the run fails once it has started."""
    dist = Distributed.from_env()
    stop = StopSignals()
    new_dirs = removed_if_unused(Path(cfg.out_dir), Path(cfg.data_dir), enabled=dist.is_main)
    try:
        with dist.process_group(cfg.device), new_dirs:
            run = setup(cfg, dist, progress or Progress(0 if cfg.budgeted else cfg.max_iters))
            stop.install()
            try:
                stopped_by = train(run, stop)
            except WriteError as exc:
                raise failed_write(exc, run.files.out_dir, run.saved_step) from None
            finally:
                stop.loop_ended()
                run.report.close()
                run.unwrap()
        return finish(run, stopped_by, stop)
    finally:
        stop.uninstall()


def train(run: Run, stop: StopSignals) -> str | None:
    """Train from ``run.state`` to the end of the run (``max_iters`` steps or
    ``time_budget`` seconds of training); returns the name of the signal that stopped the
    run early, or None. Raises DivergedError on a non-finite loss and WriteError when a
    file cannot be written."""
    cfg, state, every = run.cfg, run.state, run.cadence.agree
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size
    meter = Throughput(tokens_per_step * run.dist.world_size)
    length = RunLength(cfg, run.dist, run.device, every, state)
    losses = LossWatch(run.device)
    state.start_clock()
    run.model.train()
    while not length.done:
        with state.timed_step():
            lr = cfg.learning_rate_at(state.step, length.progress)
            run.optimizer.set_learning_rate(lr)
            batches = micro_batches(run)
            loss = train_step(
                run.train_model, run.optimizer, batches, cfg.grad_clip, run.autocast, run.no_sync
            )
            losses.add(loss)
            state.step += 1
            state.tokens_seen += meter.tokens_per_step
        meter.step()
        length.update(state)
        run.report.step(state.step, lr, loss, meter, length.fraction, length.eta(meter))

        evaluated = state.step % cfg.eval_interval == 0 or length.done
        if evaluated or state.step % every == 0:
            check_losses(run, losses)
        if evaluated:
            evaluate_and_checkpoint(run, lr, length, meter)
            meter.restart()

        received = stop.check(run.dist, run.device, state.step, length.done, every)
        if received is not None:
            if not evaluated:
                check_losses(run, losses)
                save_latest(run, None, None)
            run.report.line(
                f"{received.name}: stopped at step {state.step}; continue with --resume"
            )
            return received.name
    return None


class RunLength:
    """How much of the run is done, the same on every rank: ``max_iters`` steps, or
    ``time_budget`` seconds of training steps (evaluating and saving do not count). Under
    a budget the ranks agree on the seconds spent (the slowest rank's) every ``interval``
    steps, an all-reduce that waits for the device; in between the fraction stands."""

    def __init__(
        self,
        cfg: TrainConfig,
        dist: Distributed,
        device: torch.device,
        interval: int,
        state: TrainState,
    ) -> None:
        self.cfg, self.dist, self.device, self.interval = cfg, dist, device, interval
        self.step, self.train_s = state.step, self.agreed(state)

    def agreed(self, state: TrainState) -> float:
        return self.dist.max(state.train_s, self.device) if self.cfg.budgeted else 0.0

    def update(self, state: TrainState) -> None:
        """After each step."""
        self.step = state.step
        if state.step % self.interval == 0:
            self.train_s = self.agreed(state)

    @property
    def progress(self) -> float:
        """The schedule's: the fraction of the budget, or of the steps after warmup."""
        return self.cfg.run_progress(self.step, self.train_s)

    @property
    def fraction(self) -> float:
        """Of the whole run."""
        if self.cfg.budgeted:
            return min(1.0, self.train_s / self.cfg.time_budget)
        return min(1.0, self.step / self.cfg.max_iters)

    @property
    def done(self) -> bool:
        return self.fraction >= 1.0

    def eta(self, meter: Throughput) -> float:
        """Seconds of training left."""
        if self.cfg.budgeted:
            return max(0.0, self.cfg.time_budget - self.train_s)
        return meter.eta(self.cfg.max_iters - self.step)


def micro_batches(run: Run) -> Batches:
    """This step's batch, on the device, as ``grad_accum_steps`` micro-batches."""
    x, y = run.sampler.next_batch()
    size, device = run.cfg.batch_size, run.device
    return [
        (xs.to(device, non_blocking=True), ys.to(device, non_blocking=True))
        for xs, ys in zip(x.split(size), y.split(size), strict=True)
    ]


def train_step(
    model: torch.nn.Module,
    optimizer: Optimizers,
    batches: Batches,
    grad_clip: float,
    autocast: contextlib.AbstractContextManager[Any],
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> torch.Tensor:
    """One optimizer step on a batch given as micro-batches, whose gradients add up: each
    loss weighs 1/len(batches), so N micro-batches of B step like one batch of N*B. Under
    DDP, ``no_sync`` holds the gradients' all-reduce back until the last micro-batch.
    Returns the batch loss (not synchronised)."""
    optimizer.zero_grad()
    losses = []
    for i, (x, y) in enumerate(batches):
        with contextlib.nullcontext() if i == len(batches) - 1 else no_sync():
            with autocast:
                _, loss = model(x, y)
            (loss / len(batches)).backward()
        losses.append(loss.detach())
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    return torch.stack(losses).mean()


class LossWatch:
    """Whether a training loss was non-finite, noted on the device; looking waits for it,
    so the loop looks every ``SyncCadence.agree`` steps and before it saves."""

    def __init__(self, device: torch.device) -> None:
        self.non_finite = torch.zeros((), dtype=torch.bool, device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.non_finite |= ~torch.isfinite(loss)


def check_losses(run: Run, losses: LossWatch) -> None:
    """Raise DivergedError if a training loss since the start was non-finite (on any rank)."""
    if run.dist.any(bool(losses.non_finite.item()), run.device):
        what = f"the training loss became non-finite by step {run.state.step}"
        raise diverged(what, run.saved_step)


def evaluate_and_checkpoint(run: Run, lr: float, length: RunLength, meter: Throughput) -> None:
    """Evaluate both splits (at the end of a budgeted run, the whole validation split
    too), then write, in this order: ``model.safetensors`` on a new best validation loss,
    the log line, the checkpoint (``save_latest``)."""
    state = run.state
    rate, eta = meter.rate(), length.eta(meter)
    train_loss = evaluate(run, run.eval_batches["train"])
    val_loss = evaluate(run, run.eval_batches["val"])
    if length.done and run.cfg.budgeted:  # ends on the whole split, even if --eval-tokens
        run.exact_val_loss = val_loss
        if run.cfg.eval_tokens:
            run.exact_val_loss = evaluate(run, run.eval_batches["exact_val"])
    if not all(map(math.isfinite, (train_loss, val_loss, run.exact_val_loss or 0.0))):
        what = f"the evaluation loss is {val_loss} at step {state.step}"
        raise diverged(what, run.saved_step)
    improved = val_loss < state.best_val_loss  # always compared with its own kind
    if improved:
        state.best_val_loss = val_loss
        if run.dist.is_main:
            require_finite_weights(run)  # the one scan of this save
            publish_weights(run, run.files.model, train_loss, run.exact_val_loss or val_loss)
            run.report.published("best")
    state.clock()
    evaluation = Evaluation(
        step=state.step,
        train_loss=train_loss,
        val_loss=val_loss,
        exact_val_loss=run.exact_val_loss,
        improved=improved,
        lr=lr,
        tokens=state.tokens_seen,
        tokens_per_s=rate,
        elapsed_s=state.elapsed_s,
        train_s=state.train_s,
        eta_s=eta,
    )
    run.report.evaluation(evaluation, state.best_val_loss)
    save_latest(run, train_loss, run.exact_val_loss or val_loss, weights_checked=improved)


@torch.inference_mode()
def evaluate(run: Run, batches: Batches) -> float:
    """Mean cross-entropy over every target of ``batches`` (summed across ranks)."""
    model, device = run.model, run.device
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with run.autocast:
            logits, _ = model(x)
        total[0] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        total[1] += y.numel()
    run.dist.sum(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def finish(run: Run, stopped_by: str | None, stop: StopSignals) -> TrainResult:
    """The run's result, with rank 0's end-of-run sample unless a signal cuts it short."""
    published = run.files.model if run.files.model.exists() else None
    result = TrainResult(
        run.state.step, run.state.best_val_loss, run.exact_val_loss, published, stopped_by
    )
    if run.dist.is_main and stopped_by is None and published and run.cfg.sample_length:
        try:
            with stop.interruptible():
                result = replace(result, sample=sample_from(published, run.cfg))
        except LateSignalError:
            result = replace(result, sample_skipped=True)
    return replace(result, late_signal=stop.late.name if stop.late else None)


def sample_from(checkpoint: Path, cfg: TrainConfig) -> str:
    """``cfg.sample_length`` characters from the published model, seeded, from token 0."""
    served = load_checkpoint(checkpoint, resolve_device(cfg.device))
    new = reference_generate(served.model, [0], cfg.sample_length, SamplingParams(), cfg.seed)
    return served.tokenizer.decode(new)


@dataclass(frozen=True)
class TrainResult:
    step: int
    best_val_loss: float
    exact_val_loss: float | None  # the last evaluation's, over the whole validation split
    checkpoint: Path | None  # model.safetensors, when the run has published one
    stopped_by: str | None  # signal name when the run was interrupted
    sample: str = ""
    sample_skipped: bool = False  # a signal came while the sample was drawn
    late_signal: str | None = None  # a signal that came once the loop had ended
