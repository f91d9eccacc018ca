"""Batches and evaluation windows, gathered from the corpus's token ids (a map of its
cache file, ``trainer/corpus.py``): the random training windows of each step
(``BatchSampler``) and the fixed windows of an exact evaluation (``EvalWindows``). Only
each batch becomes int64.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (inputs, targets)


class WindowReader:
    """Windows of ``ids`` gathered as int64 batches: the only copy of the corpus ever made,
    a batch at a time.

    Ids in a file (``np.memmap``) are read through a map of their own. Every page a map
    touches stays in the process's resident memory until the map goes, so the map of a
    large corpus, kept for a whole run, would grow to the size of the file. Beyond
    ``KEEP_BYTES``, the map is made anew after every ``REMAP_AFTER`` windows (nanoGPT makes
    one per batch). Measured on this project's machine: a window read through a fresh map
    makes about 0.6 MB resident, and a new map costs about 0.2 ms.
    """

    KEEP_BYTES = 64 << 20  # a map this small may stay resident whole
    REMAP_AFTER = 64  # windows

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids
        self._map: np.ndarray | None = None
        self._read = 0  # windows read through it

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """``ids[index]``: one row per window of ``index`` (windows, length)."""
        large = self.ids.nbytes > self.KEEP_BYTES
        if self._map is None or (large and self._read >= self.REMAP_AFTER):
            ids = self.ids
            if isinstance(ids, np.memmap):
                ids = np.memmap(ids.filename, ids.dtype, "r", ids.offset, ids.shape)
            self._map, self._read = ids, 0
        self._read += len(index)
        return torch.from_numpy(self._map[index.numpy()].astype(np.int64))


class BatchSampler:
    """Random training windows, as the lecture's ``get_batch`` draws them.

    Every process draws the same ``batch_size * world_size`` offsets from one generator
    and keeps its own slice, so the generator's state is the same on every rank and one
    saved state resumes them all.
    """

    def __init__(
        self,
        data: np.ndarray,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data = data
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.generator = torch.Generator().manual_seed(seed)
        self._reader = WindowReader(self.data)
        self._window = torch.arange(block_size + 1)
        self._max_start = len(data) - block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            self._max_start, (self.batch_size * self.world_size,), generator=self.generator
        )
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = self._reader.gather(mine[:, None] + self._window)
        return windows[:, :-1], windows[:, 1:]


@dataclass(frozen=True)
class EvalWindows:
    """Fixed windows for an exact, repeatable loss: ``starts`` of full ``block_size``
    windows plus one shorter ``tail`` window; every listed target is scored once."""

    data: np.ndarray
    block_size: int
    starts: torch.Tensor
    tail_start: int
    tail_length: int

    @property
    def num_targets(self) -> int:
        return len(self.starts) * self.block_size + self.tail_length

    @classmethod
    def covering(cls, data: np.ndarray, block_size: int) -> EvalWindows:
        """Consecutive windows over all of ``data``: each character after the first is a
        target once."""
        n_targets = len(data) - 1
        n_full = n_targets // block_size
        return cls(
            data,
            block_size,
            torch.arange(n_full) * block_size,
            n_full * block_size,
            n_targets - n_full * block_size,
        )

    @classmethod
    def spread(cls, data: np.ndarray, block_size: int, n_targets: int) -> EvalWindows:
        """``n_targets`` targets in windows spaced evenly over ``data`` (a fixed sample)."""
        n_targets = min(n_targets, len(data) - 1)
        n_full = n_targets // block_size
        last_start = len(data) - block_size - 1
        # float32 as ever, so the windows stay where they were; past 2**24 characters
        # float32 rounds, possibly beyond the last start, hence the clamp.
        starts = torch.linspace(0, last_start, n_full).long().clamp_(max=last_start)
        return cls(data, block_size, starts, 0, n_targets - n_full * block_size)

    def batches(self, batch_size: int, rank: int = 0, world_size: int = 1) -> WindowBatches:
        """This rank's share of the windows as (inputs, targets) batches."""
        return WindowBatches(self, batch_size, rank, world_size)


@dataclass(frozen=True)
class WindowBatches:
    """A rank's share of ``EvalWindows`` in batches, gathered from the corpus each time
    they are iterated (the windows' starts are kept, not their characters)."""

    windows: EvalWindows
    batch_size: int
    rank: int = 0
    world_size: int = 1

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        reader = WindowReader(self.windows.data)
        window = torch.arange(self.windows.block_size + 1)
        mine = self.windows.starts[self.rank :: self.world_size]
        for i in range(0, len(mine), self.batch_size):
            w = reader.gather(mine[i : i + self.batch_size, None] + window)
            yield w[:, :-1], w[:, 1:]
        tail_start, tail_length = self.windows.tail_start, self.windows.tail_length
        if tail_length and self.rank == 0:
            w = reader.gather(torch.arange(tail_start, tail_start + tail_length + 1)[None])
            yield w[:, :-1], w[:, 1:]
