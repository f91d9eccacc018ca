"""The training loop: one process, or one of several under ``torchrun`` (DDP).

``run_training`` sets a run up (``setup``: device and precision, the run directory, the
corpus, the model and optimizer, the state to resume), then ``train`` runs the loop for
``max_iters`` steps or ``time_budget`` seconds of training (``RunLength``), calling
``evaluate_and_checkpoint`` every ``eval_interval`` steps and at the end.

What a run writes to ``out_dir`` (rank 0 only; ``trainer/state.py``), in this order at
each evaluation:

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
import errno
import math
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from chargpt.checkpoint import CheckpointInfo, checkpoint_bytes, load_checkpoint
from chargpt.model import GPT, reference_generate
from chargpt.runtime import configure_cpu_threads, keep_freed_memory_mapped, resolve_device
from chargpt.sampling import SamplingParams
from trainer.config import NOT_RECORDED, TrainConfig
from trainer.data import (
    BatchSampler,
    Corpus,
    DataError,
    EvalWindows,
    fetch_tiny_shakespeare,
    prepare_corpus,
)
from trainer.distributed import Distributed
from trainer.errors import DivergedError, RunError, TrainError
from trainer.metrics import TrainerMetrics
from trainer.optim import Optimizers
from trainer.progress import Progress
from trainer.report import Evaluation, Report, Throughput
from trainer.resume import load_resumable, restore
from trainer.signals import SYNC_INTERVAL, LateSignalError, StopSignals
from trainer.state import (
    RunFiles,
    TrainState,
    WriteError,
    gather_rng_states,
    publish,
    remove,
    save_train_state,
    trim_log,
)

__all__ = ["RunError", "TrainError", "TrainResult", "run_training"]

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


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


def run_training(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train per ``cfg``. Raises TrainError (or DataError) before writing anything when an
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
                raise failed_write(exc, run.files, run.saved_step) from None
            finally:
                stop.loop_ended()
                run.report.close()
                run.unwrap()
        return finish(run, stopped_by, stop)
    finally:
        stop.uninstall()


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


@contextlib.contextmanager
def removed_if_unused(*dirs: Path, enabled: bool = True) -> Iterator[None]:
    """Directories among ``dirs`` (and their parents) that the block creates are removed
    again if it fails while they are still empty: a failed run leaves no empty directory
    behind."""
    new = {p for d in dirs for p in (d, *d.parents) if not p.exists()} if enabled else set()
    try:
        yield
    except BaseException:
        for path in sorted(new, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):
                path.rmdir()
        raise


def failed_write(exc: WriteError, files: RunFiles, saved_step: int | None) -> RunError:
    """What failed and why, what is intact, and what to do."""
    if not files.out_dir.is_dir():
        return RunError(
            f"{exc} (the run directory {files.out_dir} is gone): nothing is left to resume; "
            f"train again"
        )
    fix = {
        errno.ENOSPC: "free space",
        errno.EDQUOT: "free space",
        errno.EIO: "check the disk",
        errno.EROFS: "make it writable",
        errno.EACCES: "make it writable",
    }.get(exc.cause.errno or 0, "fix that")
    if saved_step is None:
        return RunError(
            f"{exc}; no checkpoint was saved yet: {fix} and train again with --overwrite"
        )
    return RunError(
        f"{exc}; the checkpoint of step {saved_step} is intact: {fix} and run again with --resume"
    )


# ---------------------------------------------------------------------------------------
# Setup


@dataclass
class Run:
    """A run, set up: everything the loop works with."""

    cfg: TrainConfig  # the settings in force (a resumed run's own, with allowed changes)
    dist: Distributed
    device: torch.device
    autocast: contextlib.AbstractContextManager[Any]
    files: RunFiles
    corpus: Corpus
    model: GPT  # the weights: evaluated and saved
    train_model: torch.nn.Module  # the same weights as trained: under DDP and/or compiled
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]]  # DDP's, for micro-batches
    optimizer: Optimizers
    sampler: BatchSampler
    eval_batches: dict[str, Batches]  # by split, this rank's share
    state: TrainState
    report: Report
    losses: LossWatch
    saved_step: int | None  # the step of the last checkpoint that landed (resume.pt)
    exact_val_loss: float | None = None  # over the whole split, at the end of the run

    def unwrap(self) -> None:
        """Let go of DDP (and the compiled wrapper), which hold the process group: when
        ``process_group()`` then destroys it, this process's last reference to the group
        is torch's own, whose release joins gloo's threads without the GIL. Released by
        DDP instead, later, the GIL held, the join waits forever for a gloo thread that
        needs the GIL to let go of a finished collective's tensor."""
        self.train_model, self.no_sync = self.model, contextlib.nullcontext


def setup(cfg: TrainConfig, dist: Distributed, progress: Progress) -> Run:
    """Everything before the first step. Bad input raises TrainError (or DataError)
    before anything is written."""
    device, autocast = setup_device(cfg, dist)
    files = RunFiles(Path(cfg.out_dir))
    dist.on_main(lambda: check_run_dir(files, cfg), (TrainError,))
    corpus = load_corpus(cfg, dist, progress)
    resumed = None
    if cfg.resume:
        resumed, cfg = load_resumable(files, cfg, corpus)
    elif not cfg.run_name:
        cfg = replace(cfg, run_name=datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S"))
    model, optimizer, sampler = init_model(cfg, corpus, device, dist)
    state, changes = TrainState(cfg.run_name, corpus.sha256, cfg.to_dict()), {}
    if resumed is not None:
        state = resumed
        changes = restore(state, cfg, model, optimizer, sampler, device, dist)
    report = start_report(cfg, dist, device, files, state, progress)
    dist.on_main(lambda: tidy_run_dir(files, cfg, resumed), (RunError,))
    report.line(
        f"{state.run_name}: {model.num_parameters() / 1e6:.2f}M parameters, vocab "
        f"{corpus.tokenizer.vocab_size}, {len(corpus.train):,} train / {len(corpus.val):,} val "
        f"characters, device {device}"
        + (f" x{dist.world_size} ranks" if dist.enabled else "")
        + (f", resuming at step {state.step}" if resumed is not None else "")
    )
    for name, (before, now) in changes.items():
        report.line(f"resumed with {name} {now} (was {before})")
    for warning in cfg.warnings():
        report.line(f"note: {warning}")
    train_model = wrapped_for_training(model, cfg, dist, device)  # last: nothing raises after it
    return Run(
        cfg=cfg,
        dist=dist,
        device=device,
        autocast=autocast,
        files=files,
        corpus=corpus,
        model=model,
        train_model=train_model,
        no_sync=train_model.no_sync if dist.enabled else contextlib.nullcontext,
        optimizer=optimizer,
        sampler=sampler,
        eval_batches=eval_batches(cfg, corpus, dist),
        state=state,
        report=report,
        losses=LossWatch(device, 1 if device.type == "cpu" and not dist.enabled else SYNC_INTERVAL),
        saved_step=None if resumed is None else state.step,
    )


def wrapped_for_training(
    model: GPT, cfg: TrainConfig, dist: Distributed, device: torch.device
) -> torch.nn.Module:
    """``model`` as the loop trains it: under DDP with torchrun, compiled with --compile."""
    train_model: torch.nn.Module = model
    if dist.enabled:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]
    return train_model


def setup_device(
    cfg: TrainConfig, dist: Distributed
) -> tuple[torch.device, contextlib.AbstractContextManager[Any]]:
    """This rank's device, with its threads set up, and the autocast to train under."""
    keep_freed_memory_mapped()
    try:
        device = resolve_device(cfg.device)
    except ValueError as exc:
        raise TrainError(str(exc)) from None
    if device.type == "cuda" and dist.enabled:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        configure_cpu_threads(dist.local_world_size)
    use_bf16 = cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    if use_bf16:
        return device, torch.autocast(device.type, dtype=torch.bfloat16)
    return device, contextlib.nullcontext()


def check_run_dir(files: RunFiles, cfg: TrainConfig) -> None:
    """The output directory must be writable, hold a run to resume if asked to, and hold
    none that a new run would replace unless told to overwrite it."""
    try:
        files.out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=files.out_dir):
            pass
    except OSError as exc:
        raise TrainError(
            f"output directory {files.out_dir} is not writable: {exc.strerror}"
        ) from None
    if cfg.resume and not files.resume.exists():
        raise TrainError(f"--resume: no run to resume in {cfg.out_dir} ({files.resume} is missing)")
    if cfg.auto_resume and not cfg.resume and files.model.exists():
        raise TrainError(
            f"--auto-resume: {cfg.out_dir} holds model.safetensors but no checkpoint to "
            f"continue ({files.resume} is missing): a run stopped before its first "
            f"checkpoint completed, or another model; move it away, or start over with "
            f"--overwrite instead of --auto-resume"
        )
    if not cfg.resume and not cfg.overwrite and (files.model.exists() or files.resume.exists()):
        raise TrainError(
            f"{cfg.out_dir} already holds a run; pass --resume to continue it or "
            f"--overwrite to start a new one in its place"
        )


def tidy_run_dir(files: RunFiles, cfg: TrainConfig, resumed: TrainState | None) -> None:
    """Before the first step: remove what interrupted saves left (temporary files, log
    lines newer than the state resumed from), or, with --overwrite, the replaced run's
    state and log (its model.safetensors is served until the new run publishes one)."""
    try:
        for path in files.temporaries():
            remove(path)
        if cfg.overwrite:
            for path in (files.resume, files.latest, files.log):
                remove(path)
        if resumed is not None:
            trim_log(files.log, resumed.step)
    except WriteError as exc:
        raise failed_write(exc, files, resumed.step if resumed else None) from None


def load_corpus(cfg: TrainConfig, dist: Distributed, progress: Progress) -> Corpus:
    """The text, encoded into its cache in ``--data-dir`` and memory-mapped. Rank 0
    downloads Tiny Shakespeare if needed and checks or builds the cache while the other
    ranks wait; each then maps it, or raises rank 0's DataError."""

    def prepare() -> Path:
        source = Path(cfg.data) if cfg.data else fetch_tiny_shakespeare(cfg.data_dir)
        return prepare_corpus(source, Path(cfg.data_dir), cfg.block_size, progress.log)

    outcome = dist.on_main(prepare, (DataError,))
    return Corpus.open(outcome, cfg.block_size)


def init_model(
    cfg: TrainConfig, corpus: Corpus, device: torch.device, dist: Distributed
) -> tuple[GPT, Optimizers, BatchSampler]:
    """A new model, its optimizer and the batch sampler: the same initial weights and
    batches on every rank, different dropout masks."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(corpus.tokenizer.vocab_size)).to(device)
    optimizer = Optimizers(model, cfg, device)
    sampler = BatchSampler(  # one draw per optimizer step: every micro-batch's windows
        corpus.train,
        cfg.block_size,
        cfg.batch_size * cfg.grad_accum_steps,
        cfg.seed,
        dist.rank,
        dist.world_size,
    )
    torch.manual_seed((cfg.seed + dist.rank) % 2**64)
    return model, optimizer, sampler


def eval_batches(cfg: TrainConfig, corpus: Corpus, dist: Distributed) -> dict[str, Batches]:
    """Fixed windows, this rank's share: the whole validation split, or ``eval_tokens`` of
    it evenly spread (then, for the end of a budgeted run, the whole split as
    ``exact_val``), and a train sample of the same size."""
    windows = {"val": EvalWindows.covering(corpus.val, cfg.block_size)}
    if cfg.eval_tokens:
        if cfg.budgeted:
            windows["exact_val"] = windows["val"]
        windows["val"] = EvalWindows.spread(corpus.val, cfg.block_size, cfg.eval_tokens)
    windows["train"] = EvalWindows.spread(corpus.train, cfg.block_size, windows["val"].num_targets)
    return {
        split: w.batches(cfg.eval_batch_size, dist.rank, dist.world_size)
        for split, w in windows.items()
    }


def start_report(
    cfg: TrainConfig,
    dist: Distributed,
    device: torch.device,
    files: RunFiles,
    state: TrainState,
    progress: Progress,
) -> Report:
    """Console, metrics (served on ``metrics_port``) and log, reported by rank 0."""
    metrics = TrainerMetrics()
    metrics.run.info({"run_name": state.run_name, "device": str(device), "out_dir": cfg.out_dir})
    metrics.max_steps.set(cfg.max_iters)
    metrics.step.set(state.step)

    def serve() -> None:
        try:
            metrics.serve(cfg.metrics_port)
        except OSError as exc:
            raise TrainError(
                f"cannot serve metrics on port {cfg.metrics_port}: {exc.strerror}"
            ) from None

    if cfg.metrics_port:
        dist.on_main(serve, (TrainError,))
    loss_interval = 1 if device.type == "cpu" else SYNC_INTERVAL
    return Report(dist.is_main, progress, metrics, files.log, loss_interval)


# ---------------------------------------------------------------------------------------
# The loop


def train(run: Run, stop: StopSignals) -> str | None:
    """Train from ``run.state`` to the end of the run (``max_iters`` steps or
    ``time_budget`` seconds of training); returns the name of the signal that stopped the
    run early, or None. Raises DivergedError on a non-finite loss and WriteError when a
    file cannot be written."""
    cfg, state = run.cfg, run.state
    tokens_per_step = cfg.batch_size * cfg.grad_accum_steps * cfg.block_size
    meter = Throughput(tokens_per_step * run.dist.world_size)
    length = RunLength(cfg, run.dist, run.device, run.losses.interval, state)
    started = time.monotonic() - state.elapsed_s
    run.model.train()
    while not length.done:
        step_started = time.monotonic()
        lr = cfg.learning_rate_at(state.step, length.progress)
        run.optimizer.set_learning_rate(lr)
        batches = micro_batches(run)
        loss = train_step(
            run.train_model, run.optimizer, batches, cfg.grad_clip, run.autocast, run.no_sync
        )
        run.losses.add(loss)
        state.step += 1
        state.tokens_seen += meter.tokens_per_step
        state.elapsed_s = time.monotonic() - started
        meter.step()
        state.train_s += time.monotonic() - step_started
        length.update(state)
        run.report.step(state.step, lr, loss, meter, length.fraction, length.eta(meter))

        evaluated = state.step % cfg.eval_interval == 0 or length.done
        if evaluated or state.step % run.losses.interval == 0:
            check_losses(run)
        if evaluated:
            evaluate_and_checkpoint(run, lr, length, meter, started)
            meter.restart()

        received = stop.check(run.dist, run.device, state.step, last=length.done)
        if received is not None:
            if not evaluated:
                check_losses(run)
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
    so the loop looks every ``interval`` steps and before it saves."""

    def __init__(self, device: torch.device, interval: int) -> None:
        self.interval = interval
        self.non_finite = torch.zeros((), dtype=torch.bool, device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.non_finite |= ~torch.isfinite(loss)


def check_losses(run: Run) -> None:
    """Raise DivergedError if a training loss since the start was non-finite (on any rank)."""
    if run.dist.any(bool(run.losses.non_finite.item()), run.device):
        raise diverged(run, f"the training loss became non-finite by step {run.state.step}")


def diverged(run: Run, what: str) -> DivergedError:
    """The error for a run whose loss or weights became non-finite: nothing is saved."""
    fix = "lower --learning-rate (or set --grad-clip)"
    if run.saved_step is None:
        return DivergedError(f"{what}; nothing was saved: {fix} and train again")
    return DivergedError(
        f"{what}; stopped without saving: the checkpoint of step {run.saved_step} is intact; "
        f"{fix} and run again with --resume"
    )


def evaluate_and_checkpoint(
    run: Run, lr: float, length: RunLength, meter: Throughput, started: float
) -> None:
    """Evaluate both splits (at the end of a budgeted run, the whole validation split
    too), then write, in this order: ``model.safetensors`` on a new best validation loss,
    the log line, the checkpoint (``save_latest``). ``started``: when the run's elapsed
    time was 0."""
    state = run.state
    rate, eta = meter.rate(), length.eta(meter)
    train_loss = evaluate(run, run.eval_batches["train"])
    val_loss = evaluate(run, run.eval_batches["val"])
    if length.done and run.cfg.budgeted:  # ends on the whole split, even if --eval-tokens
        run.exact_val_loss = val_loss
        if run.cfg.eval_tokens:
            run.exact_val_loss = evaluate(run, run.eval_batches["exact_val"])
    if not all(map(math.isfinite, (train_loss, val_loss, run.exact_val_loss or 0.0))):
        raise diverged(run, f"the evaluation loss is {val_loss} at step {state.step}")
    improved = val_loss < state.best_val_loss  # always compared with its own kind
    if improved:
        state.best_val_loss = val_loss
        if run.dist.is_main:
            publish_weights(run, run.files.model, train_loss, run.exact_val_loss or val_loss)
            run.report.published("best")
    state.elapsed_s = time.monotonic() - started
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
    save_latest(run, train_loss, run.exact_val_loss or val_loss)


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


def save_latest(run: Run, train_loss: float | None, val_loss: float | None) -> None:
    """The checkpoint: the ``TrainState`` with the latest weights, whose landing makes it
    complete; then the same weights as ``latest.safetensors``. Every rank takes part (each
    one's random generator state is gathered); rank 0 writes."""
    torch_rng, cuda_rng = gather_rng_states(run.device, run.dist)
    if not run.dist.is_main:
        return
    require_finite_weights(run)
    state = run.state
    state.weights = run.model.state_dict()
    state.optimizers = run.optimizer.state_dict()
    state.batch_rng = run.sampler.generator.get_state()
    state.torch_rng, state.cuda_rng = torch_rng, cuda_rng
    try:
        save_train_state(run.files.resume, state)
    finally:
        state.weights, state.optimizers = {}, {}
    run.saved_step = state.step
    publish_weights(run, run.files.latest, train_loss, val_loss)
    run.report.published("latest")


def publish_weights(run: Run, path: Path, train_loss: float | None, val_loss: float | None) -> None:
    """The model as it is now, in the served format, at ``path``."""
    require_finite_weights(run)
    publish(path, checkpoint_bytes(run.model, describe(run, train_loss, val_loss)))


def require_finite_weights(run: Run) -> None:
    finite = torch.stack([torch.isfinite(p).all() for p in run.model.parameters()]).all()
    if not finite:
        raise diverged(run, f"the weights became non-finite by step {run.state.step}")


def describe(run: Run, train_loss: float | None, val_loss: float | None) -> CheckpointInfo:
    """The metadata of a checkpoint of the model as it is now: the settings in force, and
    those changed on resume."""
    training = {k: v for k, v in run.cfg.to_dict().items() if k not in NOT_RECORDED}
    if run.state.changes:
        training["changed_on_resume"] = run.state.changes
    return CheckpointInfo(
        config=run.model.config,
        vocab=run.corpus.tokenizer.vocab,
        step=run.state.step,
        train_loss=train_loss,
        val_loss=val_loss,
        dataset_sha256=run.corpus.sha256,
        run_name=run.state.run_name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        training={
            **training,
            "world_size": run.dist.world_size,
            "train_s": round(run.state.train_s, 3),  # seconds of training steps so far
        },
    )
