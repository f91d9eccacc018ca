"""The training loop: one process, or one of several under ``torchrun`` (DDP).

``run_training`` sets a run up (``setup``: device and precision, the run directory, the
corpus, the model and optimizer, the state to resume), then ``train`` runs the loop, which
every ``eval_interval`` steps calls ``evaluate_and_checkpoint``.

What a run writes to ``out_dir`` (rank 0 only; ``trainer/state.py``):
- ``model.safetensors``: the best model by validation loss: the file the server loads.
- ``latest.safetensors`` + ``resume.pt``: the latest weights and the ``TrainState`` that
  continues them exactly (step, optimizer moments, random generators, ...). ``resume.pt``
  is written last and names the digest of the weights it belongs to, so a pair is complete
  only when both have landed.
- ``log.jsonl``: one JSON object per evaluation.
"""

from __future__ import annotations

import contextlib
import signal
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from chargpt.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from chargpt.model import GPT, reference_generate
from chargpt.runtime import configure_cpu_threads, keep_freed_memory_mapped, resolve_device
from chargpt.sampling import SamplingParams
from trainer.config import ARCHITECTURE_FIELDS, TrainConfig
from trainer.data import (
    BatchSampler,
    Corpus,
    DataError,
    EvalWindows,
    fetch_tiny_shakespeare,
    prepare_corpus,
)
from trainer.distributed import Distributed
from trainer.metrics import TrainerMetrics
from trainer.progress import Progress
from trainer.report import Evaluation, Report, Throughput
from trainer.state import (
    RunFiles,
    StateError,
    TrainState,
    gather_rng_states,
    load_train_state,
    restore_rng_states,
    save_train_state,
)

# On accelerators, steps between the loop's waits for the device: reading the batch loss
# for the progress line, and (under DDP) agreeing whether a rank was told to stop.
SYNC_INTERVAL = 10

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]


class TrainError(Exception):
    """A problem with the run's inputs, found before anything was written."""


@dataclass(frozen=True)
class TrainResult:
    step: int
    best_val_loss: float
    checkpoint: Path
    stopped_by: str | None  # signal name when the run was interrupted
    sample: str = ""


def run_training(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train per ``cfg``; raise TrainError (or DataError) before writing anything when an
    input is unusable."""
    dist = Distributed.from_env()
    with dist.process_group(cfg.device):
        run = setup(cfg, dist, progress or Progress(cfg.max_iters))
        try:
            stopped_by = train(run)
        finally:
            run.report.close()
    result = TrainResult(run.state.step, run.state.best_val_loss, run.files.model, stopped_by)
    if dist.is_main and stopped_by is None and result.checkpoint.exists() and cfg.sample_length:
        result = replace(result, sample=sample_from(result.checkpoint, cfg))
    return result


def sample_from(checkpoint: Path, cfg: TrainConfig) -> str:
    """``cfg.sample_length`` characters from the published model, seeded, from token 0."""
    served = load_checkpoint(checkpoint, resolve_device(cfg.device))
    new = reference_generate(served.model, [0], cfg.sample_length, SamplingParams(), cfg.seed)
    return served.tokenizer.decode(new)


# ---------------------------------------------------------------------------------------
# Setup


@dataclass
class Run:
    """A run, set up: everything the loop works with."""

    cfg: TrainConfig
    dist: Distributed
    device: torch.device
    autocast: contextlib.AbstractContextManager[Any]
    files: RunFiles
    corpus: Corpus
    model: GPT  # the weights: evaluated and saved
    train_model: torch.nn.Module  # the same weights as trained: under DDP and/or compiled
    optimizer: torch.optim.Optimizer
    sampler: BatchSampler
    eval_batches: dict[str, Batches]  # by split, this rank's share
    state: TrainState
    report: Report


def setup(cfg: TrainConfig, dist: Distributed, progress: Progress) -> Run:
    """Everything before the first step. Bad input raises TrainError (or DataError)
    before anything is written."""
    device, autocast = setup_device(cfg, dist)
    files = RunFiles(Path(cfg.out_dir))
    if dist.is_main:
        check_run_dir(files, cfg)
    corpus = load_corpus(cfg, dist, progress)
    resumed = load_resumable(files, cfg, corpus) if cfg.resume else None

    model, optimizer, sampler = init_model(cfg, corpus, device, dist)
    if resumed is None:
        run_name = cfg.run_name or datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
        state = TrainState(run_name, corpus.sha256, cfg.to_dict())
    else:
        state, weights = resumed
        model.load_state_dict(weights)
        optimizer.load_state_dict(state.optimizer)
        sampler.generator.set_state(state.batch_rng)
        restore_rng_states(state, device, dist, cfg.seed)
        state.train_config = cfg.to_dict()
    train_model: torch.nn.Module = model
    if dist.enabled:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    report = start_report(cfg, dist, device, files, state, progress)
    report.line(
        f"{state.run_name}: {model.num_parameters() / 1e6:.2f}M parameters, vocab "
        f"{corpus.tokenizer.vocab_size}, {len(corpus.train):,} train / {len(corpus.val):,} val "
        f"characters, device {device}"
        + (f" x{dist.world_size} ranks" if dist.enabled else "")
        + (f", resuming at step {state.step}" if resumed is not None else "")
    )
    if cfg.overwrite and dist.is_main:
        files.log.unlink(missing_ok=True)
    return Run(
        cfg=cfg,
        dist=dist,
        device=device,
        autocast=autocast,
        files=files,
        corpus=corpus,
        model=model,
        train_model=train_model,
        optimizer=optimizer,
        sampler=sampler,
        eval_batches=eval_batches(cfg, corpus, dist),
        state=state,
        report=report,
    )


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
    if not cfg.resume and not cfg.overwrite and (files.model.exists() or files.resume.exists()):
        raise TrainError(
            f"{cfg.out_dir} already holds a run; pass --resume to continue it or "
            f"--overwrite to start a new one in its place"
        )


def load_corpus(cfg: TrainConfig, dist: Distributed, progress: Progress) -> Corpus:
    """The text, encoded into its cache in ``--data-dir`` and memory-mapped. Rank 0
    downloads Tiny Shakespeare if needed and checks or builds the cache while the other
    ranks wait; each then maps it, or raises rank 0's DataError."""
    outcome: Path | DataError | None = None
    if dist.is_main:
        try:
            source = Path(cfg.data) if cfg.data else fetch_tiny_shakespeare(cfg.data_dir)
            outcome = prepare_corpus(source, Path(cfg.data_dir), cfg.block_size, progress.log)
        except DataError as exc:
            outcome = exc
    outcome = dist.gather(outcome)[0]  # rank 0's, once it has one
    if isinstance(outcome, DataError):
        raise outcome
    return Corpus.open(outcome, cfg.block_size)


def load_resumable(
    files: RunFiles, cfg: TrainConfig, corpus: Corpus
) -> tuple[TrainState, dict[str, torch.Tensor]]:
    """The state and latest weights of the run in ``files``, if ``cfg`` and ``corpus`` can
    continue it."""
    try:
        state = load_train_state(files.resume)
    except StateError as exc:
        raise TrainError(f"--resume: {exc}") from None
    defaults = TrainConfig()  # runs saved before an option existed used its default
    saved = {
        name: state.train_config.get(name, getattr(defaults, name)) for name in ARCHITECTURE_FIELDS
    }
    different = [
        f"{name}={saved[name]} there, {getattr(cfg, name)} here"
        for name in ARCHITECTURE_FIELDS
        if saved[name] != getattr(cfg, name)
    ]
    if different:
        raise TrainError(
            f"--resume: the run in {files.out_dir} has another architecture ("
            + "; ".join(different)
            + "); pass the same settings or train into another --out-dir"
        )
    if state.dataset_sha256 != corpus.sha256:
        raise TrainError(
            f"--resume: the run in {files.out_dir} was trained on data with sha256 "
            f"{state.dataset_sha256}, but this data has {corpus.sha256}"
        )
    try:
        weights, latest = read_checkpoint(files.latest.read_bytes())
    except (OSError, CheckpointError) as exc:
        raise TrainError(f"--resume: cannot read {files.latest}: {exc}") from None
    if latest.content_sha256 != state.latest_sha256:
        raise TrainError(f"--resume: {files.latest} does not belong to {files.resume}")
    return state, weights


def init_model(
    cfg: TrainConfig, corpus: Corpus, device: torch.device, dist: Distributed
) -> tuple[GPT, torch.optim.AdamW, BatchSampler]:
    """A new model, its optimizer and the batch sampler: the same initial weights and
    batches on every rank, different dropout masks."""
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model_config(corpus.tokenizer.vocab_size)).to(device)
    optimizer = make_optimizer(model, cfg, device)
    sampler = BatchSampler(
        corpus.train, cfg.block_size, cfg.batch_size, cfg.seed, dist.rank, dist.world_size
    )
    torch.manual_seed(cfg.seed + dist.rank)
    return model, optimizer, sampler


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's grouping), fused kernel where
    PyTorch has one for the device."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.99), fused=fused)


def eval_batches(cfg: TrainConfig, corpus: Corpus, dist: Distributed) -> dict[str, Batches]:
    """Fixed windows, this rank's share: the whole validation split (or ``eval_tokens``
    of it, evenly spread) and a train sample of the same size."""
    val = EvalWindows.covering(corpus.val, cfg.block_size)
    if cfg.eval_tokens:
        val = EvalWindows.spread(corpus.val, cfg.block_size, cfg.eval_tokens)
    train = EvalWindows.spread(corpus.train, cfg.block_size, val.num_targets)
    return {
        split: windows.batches(cfg.eval_batch_size, dist.rank, dist.world_size)
        for split, windows in (("train", train), ("val", val))
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
    if cfg.metrics_port and dist.is_main:
        try:
            metrics.serve(cfg.metrics_port)
        except OSError as exc:
            raise TrainError(
                f"cannot serve metrics on port {cfg.metrics_port}: {exc.strerror}"
            ) from None
    loss_interval = 1 if device.type == "cpu" else SYNC_INTERVAL
    return Report(dist.is_main, progress, metrics, files.log, loss_interval)


# ---------------------------------------------------------------------------------------
# The loop


def train(run: Run) -> str | None:
    """Train from ``run.state`` to ``max_iters``; returns the name of the signal that
    stopped the run early, or None."""
    cfg, state = run.cfg, run.state
    meter = Throughput(cfg.batch_size * cfg.block_size * run.dist.world_size)
    started = time.monotonic() - state.elapsed_s
    stop = StopSignals()
    run.model.train()
    with stop.installed():
        while state.step < cfg.max_iters:
            lr = cfg.learning_rate_at(state.step)
            for group in run.optimizer.param_groups:
                group["lr"] = lr
            x, y = run.sampler.next_batch()
            x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
            loss = train_step(run.train_model, run.optimizer, x, y, cfg.grad_clip, run.autocast)
            state.step += 1
            state.tokens_seen += meter.tokens_per_step
            state.elapsed_s = time.monotonic() - started
            meter.step()
            run.report.step(state.step, lr, loss, meter)

            evaluated = state.step % cfg.eval_interval == 0 or state.step == cfg.max_iters
            if evaluated:
                evaluate_and_checkpoint(run, lr, meter, started)
                meter.restart()

            received = stop.check(run.dist, run.device, state.step, cfg.max_iters)
            if received is not None:
                if not evaluated:
                    save_latest(run, None, None)
                run.report.line(
                    f"{received.name}: stopped at step {state.step}; continue with --resume"
                )
                return received.name
    return None


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    grad_clip: float,
    autocast: contextlib.AbstractContextManager[Any],
) -> torch.Tensor:
    """One optimizer step on a batch; returns the batch loss (not synchronised)."""
    with autocast:
        _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip, foreach=True)
    optimizer.step()
    return loss


def evaluate_and_checkpoint(run: Run, lr: float, meter: Throughput, started: float) -> None:
    """Evaluate both splits, publish ``model.safetensors`` on a new best validation loss,
    save the latest state, and report. ``started``: when the run's elapsed time was 0."""
    state = run.state
    rate, eta = meter.rate(), meter.eta(run.cfg.max_iters - state.step)
    train_loss = evaluate(run, run.eval_batches["train"])
    val_loss = evaluate(run, run.eval_batches["val"])
    improved = val_loss < state.best_val_loss
    if improved:
        state.best_val_loss = val_loss
        if run.dist.is_main:
            save_checkpoint(run.files.model, run.model, describe(run, train_loss, val_loss))
            run.report.published("best")
    state.elapsed_s = time.monotonic() - started
    save_latest(run, train_loss, val_loss)
    evaluation = Evaluation(
        step=state.step,
        train_loss=train_loss,
        val_loss=val_loss,
        improved=improved,
        lr=lr,
        tokens=state.tokens_seen,
        tokens_per_s=rate,
        elapsed_s=state.elapsed_s,
        eta_s=eta,
    )
    run.report.evaluation(evaluation, state.best_val_loss)


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
    """Publish ``latest.safetensors``, then the ``TrainState`` that continues it. Every
    rank takes part (each one's random generator state is gathered); rank 0 writes."""
    torch_rng, cuda_rng = gather_rng_states(run.device, run.dist)
    if not run.dist.is_main:
        return
    latest = save_checkpoint(run.files.latest, run.model, describe(run, train_loss, val_loss))
    state = run.state
    state.optimizer = run.optimizer.state_dict()
    state.batch_rng = run.sampler.generator.get_state()
    state.torch_rng, state.cuda_rng = torch_rng, cuda_rng
    state.latest_sha256 = latest.content_sha256
    save_train_state(run.files.resume, state)
    run.report.published("latest")


def describe(run: Run, train_loss: float | None, val_loss: float | None) -> CheckpointInfo:
    """The metadata of a checkpoint of the model as it is now."""
    training = {k: v for k, v in run.cfg.to_dict().items() if k not in ("resume", "overwrite")}
    return CheckpointInfo(
        config=run.model.config,
        vocab=run.corpus.tokenizer.vocab,
        step=run.state.step,
        train_loss=train_loss,
        val_loss=val_loss,
        dataset_sha256=run.corpus.sha256,
        run_name=run.state.run_name,
        training={**training, "world_size": run.dist.world_size},
    )


class StopSignals:
    """SIGINT and SIGTERM become a request to stop, which the loop checks between steps.

    All ranks must stop at the same step. Under DDP they agree by an all-reduce, which waits
    for the device, so only every ``SYNC_INTERVAL`` steps and at the last step.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: object) -> None:
        self.received = signal.Signals(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopSignals]:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        try:
            yield self
        finally:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def check(
        self, dist: Distributed, device: torch.device, step: int, max_iters: int
    ) -> signal.Signals | None:
        """The signal to stop for after ``step``, once every rank knows of it (a rank that
        received none stops for another's, as for SIGTERM)."""
        if not dist.enabled:
            return self.received
        if step % SYNC_INTERVAL and step != max_iters:
            return None
        if dist.any(self.received is not None, device):
            return self.received or signal.SIGTERM
        return None
