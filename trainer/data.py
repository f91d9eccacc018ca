"""Training text: reading and checking it, Tiny Shakespeare's download, batches and
the fixed evaluation windows."""

from __future__ import annotations

import hashlib
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from chargpt.checkpoint import atomic_write
from chargpt.tokenizer import CharTokenizer

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
TINY_SHAKESPEARE_FILENAME = "tinyshakespeare.txt"
TRAIN_FRACTION = 0.9


class DataError(Exception):
    """The training text is missing, unreadable or unusable."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_text(path: str | Path) -> tuple[str, str]:
    """The text of a UTF-8 file and the sha256 of its bytes."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file {path} does not exist") from None
    except IsADirectoryError:
        raise DataError(f"data path {path} is a directory, not a text file") from None
    except OSError as exc:
        raise DataError(f"cannot read data file {path}: {exc.strerror}") from None
    if not raw:
        raise DataError(f"data file {path} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"data file {path} is not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start} is invalid"
        ) from None
    return text, sha256_hex(raw)


def fetch_tiny_shakespeare(data_dir: str | Path, url: str = TINY_SHAKESPEARE_URL) -> Path:
    """Tiny Shakespeare in ``data_dir``, downloaded once and verified by sha256."""
    data_dir = Path(data_dir)
    target = data_dir / TINY_SHAKESPEARE_FILENAME
    if target.exists():
        if sha256_hex(target.read_bytes()) != TINY_SHAKESPEARE_SHA256:
            raise DataError(
                f"{target} exists but its sha256 is not Tiny Shakespeare's "
                f"({TINY_SHAKESPEARE_SHA256}); remove it or pass --data PATH"
            )
        return target
    how_to = (
        f"download it yourself from {TINY_SHAKESPEARE_URL} to {target}, "
        f"or pass --data PATH to any UTF-8 text file"
    )
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create data directory {data_dir}: {exc.strerror}") from None
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            raw = response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"cannot download Tiny Shakespeare from {url} ({reason}); {how_to}"
        ) from None
    if sha256_hex(raw) != TINY_SHAKESPEARE_SHA256:
        raise DataError(
            f"the file downloaded from {url} has sha256 {sha256_hex(raw)}, not Tiny "
            f"Shakespeare's {TINY_SHAKESPEARE_SHA256}; {how_to}"
        )
    atomic_write(target, raw)
    return target


@dataclass(frozen=True)
class Corpus:
    """The encoded text, split 90% train / 10% validation."""

    tokenizer: CharTokenizer
    train: torch.Tensor
    val: torch.Tensor
    sha256: str

    @classmethod
    def from_text(cls, text: str, sha256: str, block_size: int) -> Corpus:
        tokenizer = CharTokenizer.from_text(text)
        data = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        n_train = int(TRAIN_FRACTION * len(data))
        train, val = data[:n_train], data[n_train:]
        shortest = min(len(train), len(val))
        if shortest < block_size + 1:
            raise DataError(
                f"data has {len(data)} characters: {len(train)} train / {len(val)} "
                f"validation after the 90/10 split, but each split needs at least "
                f"block_size + 1 = {block_size + 1}; use a longer text or a smaller --block-size"
            )
        return cls(tokenizer, train, val, sha256)


class BatchSampler:
    """Random training windows, as the lecture's ``get_batch`` draws them.

    Every process draws the same ``batch_size * world_size`` offsets from one generator
    and keeps its own slice, so the generator's state is the same on every rank and one
    saved state resumes them all.
    """

    def __init__(
        self,
        data: torch.Tensor,
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
        self._window = torch.arange(block_size + 1)
        self._max_start = len(data) - block_size

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            self._max_start, (self.batch_size * self.world_size,), generator=self.generator
        )
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        windows = self.data[mine[:, None] + self._window]
        return windows[:, :-1], windows[:, 1:]


@dataclass(frozen=True)
class EvalWindows:
    """Fixed windows for an exact, repeatable loss: ``starts`` of full ``block_size``
    windows plus one shorter ``tail`` window; every listed target is scored once."""

    data: torch.Tensor
    block_size: int
    starts: torch.Tensor
    tail_start: int
    tail_length: int

    @property
    def num_targets(self) -> int:
        return len(self.starts) * self.block_size + self.tail_length

    @classmethod
    def covering(cls, data: torch.Tensor, block_size: int) -> EvalWindows:
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
    def spread(cls, data: torch.Tensor, block_size: int, n_targets: int) -> EvalWindows:
        """``n_targets`` targets in windows spaced evenly over ``data`` (a fixed sample)."""
        n_targets = min(n_targets, len(data) - 1)
        n_full = n_targets // block_size
        last_start = len(data) - block_size - 1
        starts = torch.linspace(0, last_start, n_full).long() if n_full else torch.zeros(0).long()
        return cls(data, block_size, starts, 0, n_targets - n_full * block_size)

    def batches(
        self, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """This rank's share of the windows as (inputs, targets) batches."""
        window = torch.arange(self.block_size + 1)
        mine = self.starts[rank::world_size]
        out = []
        for i in range(0, len(mine), batch_size):
            w = self.data[mine[i : i + batch_size, None] + window]
            out.append((w[:, :-1], w[:, 1:]))
        if self.tail_length and rank == 0:
            w = self.data[self.tail_start : self.tail_start + self.tail_length + 1][None]
            out.append((w[:, :-1], w[:, 1:]))
        return out
