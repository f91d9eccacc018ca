"""This process's place in a ``torchrun`` job (DDP), and the few collectives the loop uses."""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")

# On accelerators, steps between the loop's waits for the device: reading the batch loss
# for the progress line, checking it is finite, and (under DDP) agreeing whether a rank
# was told to stop.
SYNC_INTERVAL = 10


@dataclass(frozen=True)
class Distributed:
    """Rank and world size from ``torchrun``'s environment (a job of one without it)."""

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

    @contextlib.contextmanager
    def process_group(self, device: str) -> Iterator[None]:
        """The job's process group for the duration (NCCL for CUDA, gloo otherwise)."""
        if not self.enabled:
            yield
            return
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        # Imported once a group exists (torch.optim and DDP import it when first used),
        # torch._dynamo keeps the group alive past destroy_process_group (torch 2.13), and
        # its gloo threads then run into the interpreter's shutdown, where one taking the
        # GIL aborts the process ("terminate called without an active exception").
        # Imported first, it holds nothing: the group and its threads end with the block.
        importlib.import_module("torch._dynamo")
        torch_dist.init_process_group("nccl" if cuda else "gloo")
        try:
            yield
            torch_dist.barrier()  # no rank tears the group down while another still uses it
        finally:
            torch_dist.destroy_process_group()

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` is true on any rank. Every rank must call it at the same point;
        under DDP it is an all-reduce and a device sync."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())

    def max(self, value: float, device: torch.device) -> float:
        """The largest of every rank's ``value`` (every rank must call it)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=device)
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.MAX)
        return float(tensor.item())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` summed over the ranks, in place (every rank must call it)."""
        if self.enabled:
            torch_dist.all_reduce(values)
        return values

    def on_main(self, work: Callable[[], T], errors: tuple[type[Exception], ...]) -> T:
        """``work()`` run by rank 0 alone (a check, a download, a file rank 0 writes);
        every rank gets what it returned, or raises the error of ``errors`` it raised, so
        that bad input stops every rank with rank 0's message instead of leaving the
        others at their next collective when rank 0 leaves (every rank must call it)."""
        outcome: T | Exception | None = None
        if self.is_main:
            try:
                outcome = work()
            except errors as exc:
                outcome = exc
        outcome = self.gather(outcome)[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome  # type: ignore[return-value]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (every rank must call it)."""
        if not self.enabled:
            return [obj]
        gathered: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(gathered, obj)
        return gathered


@dataclass(frozen=True)
class SyncCadence:
    """How often, in steps, the loop waits for the device: decided once per run.

    ``read``: the batch loss is read for the progress line and metrics, every step on CPU
    (where reading it does not wait) and every ``SYNC_INTERVAL`` steps on an accelerator.
    ``agree``: the loss is checked to be finite, and the ranks agree on the seconds spent
    under a budget and on a request to stop; every step for a single process on CPU,
    otherwise (an accelerator, or a collective under DDP) every ``SYNC_INTERVAL`` steps.
    """

    read: int
    agree: int

    @classmethod
    def of(cls, device: torch.device, dist: Distributed) -> SyncCadence:
        cpu = device.type == "cpu"
        return cls(
            read=1 if cpu else SYNC_INTERVAL,
            agree=1 if cpu and not dist.enabled else SYNC_INTERVAL,
        )
