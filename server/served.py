"""What the engine, the requests and the decoder share, and nothing else: a served model,
the interface of its forward passes, and the rule that says which rows decode from a
KV cache. A leaf module (it imports no other ``server`` module), so that
``server/requests.py``, ``server/engine.py`` and ``server/decoder.py`` never import each
other in a circle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from chargpt.checkpoint import LoadedModel
from chargpt.model import GPTConfig


class Row(Protocol):
    """A sequence as the decoder reads it (``server.requests.Generation``). The decoder
    never changes it: the engine advances ``computed`` once a forward pass succeeded."""

    @property
    def id(self) -> int: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def computed(self) -> int:
        """Positions of ``tokens`` (from 0) whose keys and values are in its cache slot."""
        ...


class ScoreWork(Protocol):
    """A Score request as the decoder reads it (``server.requests.ScoreJob``)."""

    @property
    def id(self) -> int: ...
    @property
    def ids(self) -> list[int]: ...
    @property
    def first_target(self) -> int: ...
    @property
    def next_target(self) -> int: ...


class Decoder(Protocol):
    """The forward passes of one model (``server.decoder.Decoder``; a fake in tests). It
    executes what the engine's schedule decided and decides nothing itself."""

    def start(self, row: Row) -> None:
        """Give ``row`` a cache slot (only rows that decode from a cache get one)."""
        ...

    def release(self, row_id: int) -> None:
        """Free the row's slot, if it has one."""
        ...

    def prefill(self, chunks: Sequence[tuple[Row, int]]) -> list[torch.Tensor | None]:
        """Positions ``computed .. computed + count`` of each row into its slot; the logits
        (vocab,) after each row whose last token is now processed, else None."""
        ...

    def decode(self, rows: Sequence[Row]) -> torch.Tensor:
        """Logits (len(rows), vocab): one new position per row, appended to its slot."""
        ...

    def recompute(self, rows: Sequence[Row]) -> torch.Tensor:
        """Logits (len(rows), vocab) of each row's last ``block_size`` characters, computed
        from position 0 (the lecture's crop; no cache)."""
        ...

    def score(self, job: ScoreWork, budget: int) -> tuple[list[float], int]:
        """Log-probabilities of the job's next targets, and the positions computed."""
        ...

    def finish_score(self, job_id: int) -> None: ...


def decodes_from_cache(config: GPTConfig, length: int) -> bool:
    """Whether a text of ``length`` characters gets its next logits from a KV cache (its
    newest position appended to what the slot holds) rather than by recomputing a window.

    A windowed model always does (its slot is its window). A model with the lecture's
    crop does while the text fits the block; past it, every position of the window
    changes at each step, so the last ``block_size`` characters are recomputed."""
    return bool(config.attention_window) or length <= config.block_size


@dataclass
class ServedModel:
    """A verified model on its device, with its serving forward passes."""

    loaded: LoadedModel
    path: str
    device: torch.device
    dtype: torch.dtype
    loaded_at: float
    decoder: Decoder

    @property
    def vocab(self) -> tuple[str, ...]:
        return self.loaded.tokenizer.vocab

    @property
    def config(self) -> GPTConfig:
        return self.loaded.info.config
