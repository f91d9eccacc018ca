"""Setting a run up: everything before its first step (``setup``), which the loop then
works with (``Run``): the device and precision, the run directory, the corpus, the model,
optimizer and batches, the state to resume, and the report. Bad input raises SetupError
(or DataError) here, before anything is written.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from chargpt.model import GPT
from chargpt.runtime import configure_cpu_threads, keep_freed_memory_mapped, resolve_device
from trainer.batches import Batches, BatchSampler, EvalWindows
from trainer.config import TrainConfig
from trainer.corpus import Corpus, DataError, fetch_tiny_shakespeare, prepare_corpus
from trainer.distributed import Distributed, SyncCadence
from trainer.errors import RunError, SetupError, WriteError, failed_write
from trainer.metrics import TrainerMetrics
from trainer.optim import Optimizers
from trainer.progress import Progress
from trainer.report import Report
from trainer.resume import load_resumable, restore
from trainer.state import RunFiles, TrainState, remove, trim_log


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
    cadence: SyncCadence  # how often the loop waits for the device
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
    """Everything before the first step. Bad input raises SetupError (or DataError)
    before anything is written."""
    device, autocast = setup_device(cfg, dist)
    cadence = SyncCadence.of(device, dist)
    files = RunFiles(Path(cfg.out_dir))
    dist.on_main(lambda: check_run_dir(files, cfg), (SetupError,))
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
    report = start_report(cfg, dist, device, files, state, progress, cadence)
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
        cadence=cadence,
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
        raise SetupError(str(exc)) from None
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
        raise SetupError(
            f"output directory {files.out_dir} is not writable: {exc.strerror}"
        ) from None
    if cfg.resume and not files.resume.exists():
        raise SetupError(f"--resume: no run to resume in {cfg.out_dir} ({files.resume} is missing)")
    if cfg.auto_resume and not cfg.resume and files.model.exists():
        raise SetupError(
            f"--auto-resume: {cfg.out_dir} holds model.safetensors but no checkpoint to "
            f"continue ({files.resume} is missing): a run stopped before its first "
            f"checkpoint completed, or another model; move it away, or start over with "
            f"--overwrite instead of --auto-resume"
        )
    if not cfg.resume and not cfg.overwrite and (files.model.exists() or files.resume.exists()):
        raise SetupError(
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
        raise failed_write(exc, files.out_dir, resumed.step if resumed else None) from None


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
    cadence: SyncCadence,
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
            raise SetupError(
                f"cannot serve metrics on port {cfg.metrics_port}: {exc.strerror}"
            ) from None

    if cfg.metrics_port:
        dist.on_main(serve, (SetupError,))
    return Report(dist.is_main, progress, metrics, files.log, cadence.read)


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
