"""A run's files and its resumable state.

``TrainState`` is both what the training loop carries from step to step and the schema of
``resume.pt``: ``save_train_state`` and ``load_train_state`` are the only code that writes
or reads that file. It is a ``torch.save`` file of tensors, numbers, strings and
containers, read back with ``weights_only=True`` (it cannot run code).

``resume.pt`` holds everything a run needs to continue, the latest weights included, so
it moves from one consistent state to the next as a unit: it is replaced atomically, and
the previous one stays until the next has fully landed. Every file of the run directory
is written through ``publish`` (atomic replace) or ``append_line`` (the log), and each of
their steps passes a named ``save_point``.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from chargpt.checkpoint import CheckpointError, atomic_write, read_checkpoint
from trainer.distributed import Distributed
from trainer.errors import WriteError

RESUME_FORMAT = "chargpt-resume/2"
# Version 1: the weights lived in latest.safetensors, which resume.pt named by digest.
RESUME_FORMAT_V1 = "chargpt-resume/1"


class StateError(Exception):
    """``resume.pt`` is missing, unreadable or not a resume file."""


@dataclass(frozen=True)
class RunFiles:
    """What a run writes to its directory (only rank 0 writes)."""

    out_dir: Path

    @property
    def model(self) -> Path:
        """The best model by validation loss: the file the server loads."""
        return self.out_dir / "model.safetensors"

    @property
    def latest(self) -> Path:
        """The latest weights in the served format, written after ``resume`` (which also
        holds them): to look at or serve; resuming does not read it."""
        return self.out_dir / "latest.safetensors"

    @property
    def resume(self) -> Path:
        """The ``TrainState``: everything a resumed run continues from."""
        return self.out_dir / "resume.pt"

    @property
    def log(self) -> Path:
        """One JSON object per evaluation."""
        return self.out_dir / "log.jsonl"

    def temporaries(self) -> list[Path]:
        """Temporary files that interrupted saves left (``atomic_write``'s names)."""
        names = (self.model, self.latest, self.resume, self.log)
        return sorted(p for name in names for p in self.out_dir.glob(f".{name.name}.*.tmp"))


def save_point(path: Path, step: str) -> None:
    """A point of the save sequence: just before ``step`` of writing ``path`` (``create``,
    ``write``, ``sync``, ``rename``, ``sync-dir`` for a published file; ``open``,
    ``write``, ``sync`` for a log line). Does nothing: the crash and disk-full tests
    replace it to kill the process or fail the write there."""


def publish(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically; a failure is a WriteError."""
    try:
        atomic_write(path, data, before=lambda step: save_point(path, step))
    except OSError as exc:
        raise WriteError(path, exc) from None


def append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path`` durably. A crash or a full disk can leave a torn last
    line, which ``trim_log`` drops on resume."""
    try:
        save_point(path, "open")
        with path.open("a", encoding="utf-8") as f:
            save_point(path, "write")
            f.write(line + "\n")
            f.flush()
            save_point(path, "sync")
            os.fsync(f.fileno())
    except OSError as exc:
        raise WriteError(path, exc) from None


def remove(path: Path) -> None:
    """Remove ``path`` if it exists; a failure is a WriteError."""
    try:
        path.unlink(missing_ok=True)
    except OSError as exc:
        raise WriteError(path, exc, "remove") from None


def trim_log(path: Path, step: int) -> None:
    """Keep the log's records up to ``step``, the state a run resumes from: a record written
    after it (the evaluation is done again) and a torn line go."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise WriteError(path, exc, "read") from None
    kept = [line for line in lines if _logged_step(line) <= step]
    if kept != lines:
        publish(path, "".join(kept).encode())


def _logged_step(line: str) -> float:
    try:
        record = json.loads(line)
        return record["step"] if line.endswith("\n") else math.inf
    except (ValueError, TypeError, KeyError):
        return math.inf


@dataclass
class TrainState:
    """Where a run stands. The counters change as the loop runs; the states of the objects
    the loop drives (model, optimizers, random generators) live in those objects and are
    captured here when the state is saved, and given back to them on resume. The run's
    stopwatch is here too: ``timed_step`` and ``clock`` keep ``elapsed_s`` and ``train_s``."""

    run_name: str
    dataset_sha256: str
    train_config: dict[str, Any]  # the settings in force (TrainConfig.to_dict())
    step: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    tokens_seen: int = 0  # training tokens, all ranks and micro-batches
    elapsed_s: float = 0.0  # wall time of the run so far, over every resume
    train_s: float = 0.0  # of which in training steps (not evaluating or saving)
    changes: list[dict[str, Any]] = field(default_factory=list)  # settings changed on resume
    # Captured at each save:
    weights: dict[str, torch.Tensor] = field(default_factory=dict)  # the model's state_dict
    optimizers: dict[str, dict[str, Any]] = field(default_factory=dict)  # state_dict by name
    batch_rng: torch.Tensor | None = None  # BatchSampler's generator, the same on every rank
    torch_rng: list[torch.Tensor] = field(default_factory=list)  # CPU generator, per rank
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # CUDA generator, per rank

    def __post_init__(self) -> None:
        self.start_clock()

    def start_clock(self) -> None:
        """Go on timing from ``elapsed_s`` (over every resume), from now: as the loop starts."""
        self._clock_zero = time.monotonic() - self.elapsed_s  # not a field: never saved

    def clock(self) -> None:
        """Bring ``elapsed_s`` up to now."""
        self.elapsed_s = time.monotonic() - self._clock_zero

    @contextlib.contextmanager
    def timed_step(self) -> Iterator[None]:
        """A training step, whose time counts in ``train_s``; ``elapsed_s`` is brought up to
        its end."""
        started = time.monotonic()
        yield
        ended = time.monotonic()
        self.elapsed_s = ended - self._clock_zero
        self.train_s += ended - started


def save_train_state(path: Path, state: TrainState) -> None:
    """Write ``state`` atomically: readers see the previous file or this one."""
    payload = {"format": RESUME_FORMAT, **{f.name: getattr(state, f.name) for f in fields(state)}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    publish(path, buffer.getvalue())


def load_train_state(path: Path) -> TrainState:
    """The state saved at ``path``; raises StateError with a one-line reason."""
    payload = _read_payload(path)
    if payload.pop("format") == RESUME_FORMAT_V1:
        payload = _from_v1(payload, path.with_name("latest.safetensors"))
    try:
        return TrainState(**payload)
    except TypeError as exc:
        raise StateError(f"{path}: resume state has other fields than expected: {exc}") from None


def read_run_config(path: Path) -> dict[str, Any]:
    """The settings of the run whose state is at ``path`` (its tensors are not read)."""
    config = _read_payload(path, mmap=True).get("train_config")
    if not isinstance(config, dict):
        raise StateError(f"{path}: resume state has no settings")
    return config


def _read_payload(path: Path, mmap: bool = False) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise StateError(f"no resume state at {path}") from None
    except Exception as exc:  # torch raises many types, with long messages, for a bad file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StateError(f"{path}: cannot read resume state: {reason}") from None
    if not isinstance(payload, dict) or payload.get("format") not in (
        RESUME_FORMAT,
        RESUME_FORMAT_V1,
    ):
        raise StateError(f"{path} is not a chargpt resume file")
    return payload


def _from_v1(payload: dict[str, Any], latest: Path) -> dict[str, Any]:
    """A version 1 state as version 2: its weights from the latest.safetensors it names."""
    try:
        weights, info = read_checkpoint(latest.read_bytes())
    except (OSError, CheckpointError) as exc:
        raise StateError(f"cannot read {latest}: {exc}") from None
    if info.content_sha256 != payload.pop("latest_sha256", None):
        raise StateError(f"{latest} does not belong to {latest.with_name('resume.pt')}")
    return {**payload, "weights": weights, "optimizers": {"adamw": payload.pop("optimizer")}}


def gather_rng_states(
    device: torch.device, dist: Distributed
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every rank's CPU and CUDA generator states (a collective: every rank calls it)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    gathered = dist.gather((torch.get_rng_state(), cuda))
    return [cpu for cpu, _ in gathered], [c for _, c in gathered if c is not None]


def restore_rng_states(
    state: TrainState, device: torch.device, dist: Distributed, seed: int
) -> None:
    """Give this rank its generator states back. Resumed on another number of ranks,
    batches still continue exactly (one generator for all ranks); dropout masks do not."""
    if len(state.torch_rng) == dist.world_size:
        torch.set_rng_state(state.torch_rng[dist.rank])
    else:
        torch.manual_seed((seed + 1000 * state.step + dist.rank) % 2**64)
    if device.type == "cuda" and len(state.cuda_rng) == dist.world_size:
        torch.cuda.set_rng_state(state.cuda_rng[dist.rank], device)
