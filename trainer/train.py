"""The training loop: one process, or one of several under ``torchrun`` (DDP).

Files in ``out_dir`` (only rank 0 writes them):
- ``model.safetensors``: the best model by validation loss: the file the server loads.
- ``latest.safetensors`` + ``resume.pt``: the latest weights and what only the trainer
  needs to continue exactly (optimizer moments, RNG states, step). ``resume.pt`` is
  written last and names the digest of the weights it belongs to, so a pair is complete
  only when both have landed.
- ``log.jsonl``: one JSON object per evaluation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from chargpt.checkpoint import (
    CheckpointError,
    CheckpointInfo,
    load_checkpoint,
    load_resume_state,
    read_checkpoint,
    save_checkpoint,
    save_resume_state,
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
    read_text,
)
from trainer.metrics import TrainerMetrics
from trainer.progress import Progress, format_duration, format_rate

RESUME_FORMAT = "chargpt-resume/1"


class TrainError(Exception):
    """A problem with the run's inputs, found before anything was written."""


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (a job of one without it)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @classmethod
    def from_env(cls) -> Distributed:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        return cls(
            rank=int(os.environ["RANK"]),
            local_rank=int(os.environ["LOCAL_RANK"]),
            world_size=world_size,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size)),
        )

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass(frozen=True)
class RunFiles:
    out_dir: Path

    @property
    def model(self) -> Path:
        return self.out_dir / "model.safetensors"

    @property
    def latest(self) -> Path:
        return self.out_dir / "latest.safetensors"

    @property
    def resume(self) -> Path:
        return self.out_dir / "resume.pt"

    @property
    def log(self) -> Path:
        return self.out_dir / "log.jsonl"

    def check_writable(self) -> None:
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.out_dir):
                pass
        except OSError as exc:
            raise TrainError(
                f"output directory {self.out_dir} is not writable: {exc.strerror}"
            ) from None


@dataclass(frozen=True)
class TrainResult:
    step: int
    best_val_loss: float
    checkpoint: Path
    stopped_by: str | None  # signal name when the run was interrupted
    sample: str = ""


class StopSignals:
    """Turns SIGINT / SIGTERM into a flag the loop checks between steps."""

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


def load_corpus(cfg: TrainConfig, dist: Distributed) -> Corpus:
    """Read (or, rank 0 first, download) the text and split it."""
    if cfg.data:
        path = Path(cfg.data)
    else:
        path = Path(cfg.data_dir) / "tinyshakespeare.txt"
        if dist.is_main:
            path = fetch_tiny_shakespeare(cfg.data_dir)
        if dist.enabled:
            torch_dist.barrier()
    text, sha256 = read_text(path)
    return Corpus.from_text(text, sha256, cfg.block_size)


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


@torch.inference_mode()
def evaluate(
    model: GPT,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    autocast: contextlib.AbstractContextManager[Any],
    dist: Distributed,
) -> float:
    """Mean cross-entropy over every target of ``batches`` (summed across ranks)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        with autocast:
            logits, _ = model(x)
        total[0] += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum")
        total[1] += y.numel()
    if dist.enabled:
        torch_dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1]).item()


def check_resumable(
    state: dict[str, Any], cfg: TrainConfig, corpus: Corpus, files: RunFiles
) -> None:
    if state.get("format") != RESUME_FORMAT:
        raise TrainError(f"--resume: {files.resume} is not a chargpt resume file")
    defaults = TrainConfig()  # runs saved before an option existed used its default
    saved = {
        name: state["train_config"].get(name, getattr(defaults, name))
        for name in ARCHITECTURE_FIELDS
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
    if state["dataset_sha256"] != corpus.sha256:
        raise TrainError(
            f"--resume: the run in {files.out_dir} was trained on data with sha256 "
            f"{state['dataset_sha256']}, but this data has {corpus.sha256}"
        )


def gather_rng_states(device: torch.device, dist: Distributed) -> tuple[list[Any], list[Any]]:
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    if not dist.enabled:
        return [cpu], [cuda] if cuda is not None else []
    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, (cpu, cuda))
    return [s[0] for s in gathered], [s[1] for s in gathered if s[1] is not None]


def restore_rng_states(
    state: dict[str, Any], device: torch.device, dist: Distributed, seed: int
) -> None:
    cpu_states, cuda_states = state["torch_rng"], state["cuda_rng"]
    if len(cpu_states) == dist.world_size:
        torch.set_rng_state(cpu_states[dist.rank])
    else:  # another world size: batches still resume exactly, dropout masks do not
        torch.manual_seed(seed + 1000 * state["step"] + dist.rank)
    if device.type == "cuda" and len(cuda_states) == dist.world_size:
        torch.cuda.set_rng_state(cuda_states[dist.rank], device)


def run_training(cfg: TrainConfig, progress: Progress | None = None) -> TrainResult:
    """Train per ``cfg``; raise TrainError (or DataError) before writing anything when an
    input is unusable."""
    dist = Distributed.from_env()
    if dist.enabled:
        backend = (
            "nccl"
            if cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
            else "gloo"
        )
        torch_dist.init_process_group(backend)
    try:
        result = _train(cfg, dist, progress or Progress(cfg.max_iters))
        if dist.enabled:  # no rank tears the group down while another still uses it
            torch_dist.barrier()
    finally:
        if dist.enabled:
            torch_dist.destroy_process_group()
    finished = result.stopped_by is None and result.checkpoint.exists()
    if dist.is_main and finished and cfg.sample_length:
        result = replace(result, sample=sample_from(result.checkpoint, cfg))
    return result


def sample_from(checkpoint: Path, cfg: TrainConfig) -> str:
    """``cfg.sample_length`` characters from the published model, seeded, from token 0."""
    served = load_checkpoint(checkpoint, resolve_device(cfg.device))
    new = reference_generate(served.model, [0], cfg.sample_length, SamplingParams(), cfg.seed)
    return served.tokenizer.decode(new)


def _train(cfg: TrainConfig, dist: Distributed, progress: Progress) -> TrainResult:
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
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    )

    files = RunFiles(Path(cfg.out_dir))
    if dist.is_main:
        files.check_writable()
        if cfg.resume and not files.resume.exists():
            raise TrainError(
                f"--resume: no run to resume in {cfg.out_dir} ({files.resume} is missing)"
            )
        if not cfg.resume and not cfg.overwrite and (files.model.exists() or files.resume.exists()):
            raise TrainError(
                f"{cfg.out_dir} already holds a run; pass --resume to continue it or "
                f"--overwrite to start a new one in its place"
            )
    corpus = load_corpus(cfg, dist)
    try:
        resume_state = load_resume_state(files.resume) if cfg.resume else None
    except CheckpointError as exc:
        raise TrainError(f"--resume: {exc}") from None
    if resume_state is not None:
        check_resumable(resume_state, cfg, corpus, files)

    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    model = GPT(cfg.model_config(corpus.tokenizer.vocab_size)).to(device)
    optimizer = make_optimizer(model, cfg, device)
    sampler = BatchSampler(
        corpus.train, cfg.block_size, cfg.batch_size, cfg.seed, dist.rank, dist.world_size
    )
    torch.manual_seed(cfg.seed + dist.rank)  # dropout masks differ across ranks
    run_name = cfg.run_name or datetime.now(UTC).strftime("run-%Y%m%d-%H%M%S")
    step, best_val, tokens_seen, elapsed_before = 0, math.inf, 0, 0.0
    if resume_state is not None:
        try:
            tensors, latest_info = read_checkpoint(files.latest.read_bytes())
        except (OSError, CheckpointError) as exc:
            raise TrainError(f"--resume: cannot read {files.latest}: {exc}") from None
        if latest_info.content_sha256 != resume_state["latest_sha256"]:
            raise TrainError(f"--resume: {files.latest} does not belong to {files.resume}")
        model.load_state_dict(tensors)
        optimizer.load_state_dict(resume_state["optimizer"])
        sampler.generator.set_state(resume_state["batch_rng"])
        restore_rng_states(resume_state, device, dist, cfg.seed)
        step = resume_state["step"]
        best_val = resume_state["best_val_loss"]
        tokens_seen = resume_state["tokens_seen"]
        elapsed_before = resume_state["elapsed_s"]
        run_name = resume_state["run_name"]

    train_model: torch.nn.Module = model
    if dist.enabled:
        train_model = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if cfg.compile:
        train_model = torch.compile(train_model)  # type: ignore[assignment]

    val_windows = EvalWindows.covering(corpus.val, cfg.block_size)
    if cfg.eval_tokens:
        val_windows = EvalWindows.spread(corpus.val, cfg.block_size, cfg.eval_tokens)
    train_windows = EvalWindows.spread(corpus.train, cfg.block_size, val_windows.num_targets)
    val_batches = val_windows.batches(cfg.eval_batch_size, dist.rank, dist.world_size)
    train_batches = train_windows.batches(cfg.eval_batch_size, dist.rank, dist.world_size)

    metrics = TrainerMetrics() if dist.is_main else None
    if metrics is not None:
        metrics.run.info({"run_name": run_name, "device": str(device), "out_dir": cfg.out_dir})
        metrics.max_steps.set(cfg.max_iters)
        metrics.step.set(step)
        if cfg.metrics_port:
            try:
                metrics.serve(cfg.metrics_port)
            except OSError as exc:
                raise TrainError(
                    f"cannot serve metrics on port {cfg.metrics_port}: {exc.strerror}"
                ) from None

    def say(line: str) -> None:
        if dist.is_main:
            progress.log(line)

    training_info = {k: v for k, v in cfg.to_dict().items() if k not in ("resume", "overwrite")}
    training_info["world_size"] = dist.world_size

    def describe(loss_train: float | None, loss_val: float | None) -> CheckpointInfo:
        return CheckpointInfo(
            config=model.config,
            vocab=corpus.tokenizer.vocab,
            step=step,
            train_loss=loss_train,
            val_loss=loss_val,
            dataset_sha256=corpus.sha256,
            run_name=run_name,
            training=training_info,
        )

    def save_latest(loss_train: float | None, loss_val: float | None, elapsed: float) -> None:
        cpu_rng, cuda_rng = gather_rng_states(device, dist)
        if not dist.is_main:
            return
        latest = save_checkpoint(files.latest, model, describe(loss_train, loss_val))
        save_resume_state(
            files.resume,
            {
                "format": RESUME_FORMAT,
                "step": step,
                "optimizer": optimizer.state_dict(),
                "batch_rng": sampler.generator.get_state(),
                "torch_rng": cpu_rng,
                "cuda_rng": cuda_rng,
                "best_val_loss": best_val,
                "tokens_seen": tokens_seen,
                "elapsed_s": elapsed,
                "train_config": cfg.to_dict(),
                "dataset_sha256": corpus.sha256,
                "latest_sha256": latest.content_sha256,
                "run_name": run_name,
            },
        )
        if metrics is not None:
            metrics.checkpoints.labels("latest").inc()

    say(
        f"{run_name}: {model.num_parameters() / 1e6:.2f}M parameters, vocab "
        f"{corpus.tokenizer.vocab_size}, {len(corpus.train):,} train / {len(corpus.val):,} val "
        f"characters, device {device}"
        + (f" x{dist.world_size} ranks" if dist.enabled else "")
        + (f", resuming at step {step}" if resume_state is not None else "")
    )
    if cfg.overwrite and dist.is_main:
        files.log.unlink(missing_ok=True)

    tokens_per_step = cfg.batch_size * cfg.block_size * dist.world_size
    stop = StopSignals()
    stopped_by: str | None = None
    started = time.monotonic()
    window_start, window_tokens = started, 0
    model.train()
    with stop.installed():
        while step < cfg.max_iters:
            lr = cfg.learning_rate_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = sampler.next_batch()
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            loss = train_step(train_model, optimizer, x, y, cfg.grad_clip, autocast)
            step += 1
            tokens_seen += tokens_per_step
            window_tokens += tokens_per_step

            now = time.monotonic()
            rate = window_tokens / max(now - window_start, 1e-9)
            eta = (cfg.max_iters - step) * tokens_per_step / max(rate, 1e-9)
            if metrics is not None:
                metrics.step.set(step)
                metrics.tokens.inc(tokens_per_step)
                metrics.learning_rate.set(lr)
                # Reading the loss waits for the device; on a GPU only every tenth step.
                if device.type == "cpu" or step % 10 == 0:
                    loss_value = loss.item()
                    metrics.batch_loss.set(loss_value)
                    progress.update(step, loss_value, rate, eta)

            if step % cfg.eval_interval == 0 or step == cfg.max_iters:
                loss_train = evaluate(model, train_batches, device, autocast, dist)
                loss_val = evaluate(model, val_batches, device, autocast, dist)
                improved = loss_val < best_val
                if improved:
                    best_val = loss_val
                    if dist.is_main:
                        save_checkpoint(files.model, model, describe(loss_train, loss_val))
                        if metrics is not None:
                            metrics.checkpoints.labels("best").inc()
                elapsed = elapsed_before + time.monotonic() - started
                save_latest(loss_train, loss_val, elapsed)
                if dist.is_main:
                    record = {
                        "step": step,
                        "train_loss": round(loss_train, 6),
                        "val_loss": round(loss_val, 6),
                        "best": improved,
                        "lr": lr,
                        "tokens": tokens_seen,
                        "tokens_per_s": round(rate, 1),
                        "elapsed_s": round(elapsed, 3),
                        "time": datetime.now(UTC).isoformat(timespec="seconds"),
                    }
                    with files.log.open("a") as log:
                        log.write(json.dumps(record) + "\n")
                    if metrics is not None:
                        metrics.loss.labels("train").set(loss_train)
                        metrics.loss.labels("val").set(loss_val)
                        metrics.best_val_loss.set(best_val)
                    width = len(str(cfg.max_iters))
                    say(
                        f"step {step:>{width}}/{cfg.max_iters} | train {loss_train:.4f} | "
                        f"val {loss_val:.4f}{' *' if improved else '  '} | lr {lr:.2e} | "
                        f"{format_rate(rate)} | {format_duration(elapsed)} elapsed, "
                        f"ETA {format_duration(eta)}"
                    )
                window_start, window_tokens = time.monotonic(), 0

            if _stop_requested(stop, dist, device):
                stopped_by = (stop.received or signal.SIGTERM).name
                if step % cfg.eval_interval and step != cfg.max_iters:
                    save_latest(None, None, elapsed_before + time.monotonic() - started)
                say(f"{stopped_by}: stopped at step {step}; continue with --resume")
                break

    if metrics is not None:
        metrics.close()
    return TrainResult(step, best_val, files.model, stopped_by)


def _stop_requested(stop: StopSignals, dist: Distributed, device: torch.device) -> bool:
    """Whether any rank received a stop signal (all ranks must stop at the same step)."""
    if not dist.enabled:
        return stop.received is not None
    flag = torch.tensor([1.0 if stop.received else 0.0], device=device)
    torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
    if flag.item() and stop.received is None:
        stop.received = signal.SIGTERM
    return bool(flag.item())


__all__ = ["DataError", "TrainError", "TrainResult", "run_training"]
