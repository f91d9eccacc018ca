"""A run's files and its resumable state.

``TrainState`` is both what the training loop carries from step to step and the schema of
``resume.pt``: ``save_train_state`` and ``load_train_state`` are the only code that writes
or reads that file. It is a ``torch.save`` file of tensors, numbers, strings and
containers, read back with ``weights_only=True`` (it cannot run code), written atomically.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from chargpt.checkpoint import atomic_write
from trainer.distributed import Distributed

RESUME_FORMAT = "chargpt-resume/1"


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
        """The latest weights, for resuming."""
        return self.out_dir / "latest.safetensors"

    @property
    def resume(self) -> Path:
        """The ``TrainState`` that goes with ``latest``; written after it."""
        return self.out_dir / "resume.pt"

    @property
    def log(self) -> Path:
        """One JSON object per evaluation."""
        return self.out_dir / "log.jsonl"


@dataclass
class TrainState:
    """Where a run stands. The counters change as the loop runs; the states of the objects
    the loop drives (optimizer, random generators) live in those objects and are captured
    here when the state is saved, and given back to them on resume."""

    run_name: str
    dataset_sha256: str
    train_config: dict[str, Any]  # TrainConfig.to_dict() of the process that saved it
    step: int = 0  # optimizer steps done
    best_val_loss: float = math.inf
    tokens_seen: int = 0  # training tokens, all ranks
    elapsed_s: float = 0.0  # wall time of the run so far, over every resume
    # Captured at each save:
    optimizer: dict[str, Any] = field(default_factory=dict)
    batch_rng: torch.Tensor | None = None  # BatchSampler's generator, the same on every rank
    torch_rng: list[torch.Tensor] = field(default_factory=list)  # CPU generator, per rank
    cuda_rng: list[torch.Tensor] = field(default_factory=list)  # CUDA generator, per rank
    latest_sha256: str = ""  # content digest of the latest.safetensors this state goes with


def save_train_state(path: str | os.PathLike[str], state: TrainState) -> None:
    """Write ``state`` atomically: readers see the previous file or this one."""
    payload = {"format": RESUME_FORMAT, **{f.name: getattr(state, f.name) for f in fields(state)}}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    atomic_write(path, buffer.getvalue())


def load_train_state(path: str | os.PathLike[str]) -> TrainState:
    """The state saved at ``path``; raises StateError with a one-line reason."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise StateError(f"no resume state at {path}") from None
    except Exception as exc:  # torch raises many types, with long messages, for a bad file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StateError(f"{path}: cannot read resume state: {reason}") from None
    if not isinstance(payload, dict) or payload.pop("format", None) != RESUME_FORMAT:
        raise StateError(f"{path} is not a chargpt resume file")
    try:
        return TrainState(**payload)
    except TypeError as exc:
        raise StateError(f"{path}: resume state has other fields than expected: {exc}") from None


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
        torch.manual_seed(seed + 1000 * state.step + dist.rank)
    if device.type == "cuda" and len(state.cuda_rng) == dist.world_size:
        torch.cuda.set_rng_state(state.cuda_rng[dist.rank], device)
