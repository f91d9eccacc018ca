"""The serving forward passes compiled ahead of time: one AOTInductor graph per batch size
(bucket), built and checked when a model loads, so no request ever pays for compiling.

A small model's eager decode step is overhead, not arithmetic: the lecture-width model
does ~0.8 MFLOP per character in ~150 small operations, each a Python call and a dispatch.
A compiled graph fuses the pointwise work and calls its kernels from C++; measured on two
CPU cores, batch 1, the windowed model: 1.77 ms eager, 0.43 ms compiled.

Each graph has static shapes. A step of B rows runs the graph of the smallest bucket that
holds them; the padding rows compute in a spare cache slot of their own (never a real
row's), and their outputs are dropped. The decode graph is functional: it reads the
rows' cached keys and values and returns the new ones, which ``decode`` then writes into
the cache in one indexed assignment (a graph that wrote into the cache would copy all of
it at every step). ``torch.export`` and AOTInductor rather than ``torch.compile``: a
packaged graph has no guards to check per call and no recompile limit to run into when a
hot reload brings new weights.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from chargpt.model import GPT

log = logging.getLogger(__name__)

Runner = Callable[..., Sequence[torch.Tensor]]
# How far a compiled graph may differ from the eager forward (float32 logits) before the
# server refuses it and serves eager: kernels fused differently round differently.
TOLERANCE = 1e-4


class CompileError(Exception):
    """The forward passes could not be compiled here (no C++ compiler, or the compiler or
    the check against eager failed)."""


def compiler_missing() -> str | None:
    """Why this machine cannot compile, or None: AOTInductor needs a C++ compiler."""
    compiler = os.environ.get("CXX") or "g++"
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler} is not on PATH)"
    return None


def batch_sizes(max_rows: int) -> list[int]:
    """The buckets for a batch cap: 1, 4, 16, ... below it, and the cap itself."""
    sizes, size = [], 1
    while size < max_rows:
        sizes.append(size)
        size *= 4
    return [*sizes, max_rows]


class FunctionalCache:
    """``chargpt.model.KVCache`` over a copy of each row's cache slot: the new position's
    key and value are placed in the copy, nothing is written back (``new_keys`` and
    ``new_values`` keep them for the caller)."""

    def __init__(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        previous: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        key_positions: torch.Tensor,
    ) -> None:
        self.keys, self.values, self.slots = keys, values, slots
        self.previous = previous
        self.rows = torch.arange(slots.shape[0], device=slots.device)
        self.columns = positions % keys.shape[3]
        self.positions = positions[:, None]
        self.key_positions = key_positions
        self.new_keys: list[torch.Tensor] = []
        self.new_values: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self.new_keys.append(k[:, :, 0])
        self.new_values.append(v[:, :, 0])
        # (an indexed write into a copy: twice as fast compiled as a torch.where that
        # broadcasts the new key over the slot)
        keys = self.keys[layer][self.slots].clone()
        values = self.values[layer][self.slots].clone()
        keys[self.rows, :, self.columns] = k[:, :, 0]
        values[self.rows, :, self.columns] = v[:, :, 0]
        return keys, values


class DecodeStep(nn.Module):
    """One new position per row: (tokens, previous, slots, positions, key_positions, keys,
    values) to (logits (B, vocab), new keys and values (n_layer, B, H, hs))."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        tokens: torch.Tensor,
        previous: torch.Tensor,
        slots: torch.Tensor,
        positions: torch.Tensor,
        key_positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cache = FunctionalCache(keys, values, previous, slots, positions, key_positions)
        logits, _ = self.model(tokens[:, None], kv_cache=cache)
        return logits[:, -1], torch.stack(cache.new_keys), torch.stack(cache.new_values)


class WindowStep(nn.Module):
    """The lecture's crop: logits (B, vocab) of each row's last ``block_size`` ids."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits, _ = self.model(ids, last_only=True)
        return logits[:, -1]


class CompiledSteps:
    """The compiled decode (and, for a model with the lecture's crop, window) forwards of
    one model, for each bucket; built by ``compile``."""

    def __init__(self, sizes: list[int], decode: list[Runner], windows: list[Runner]) -> None:
        self.sizes = sizes
        self._decode = decode
        self._windows = windows

    @classmethod
    def compile(
        cls, model: GPT, keys: torch.Tensor, values: torch.Tensor, sizes: list[int]
    ) -> CompiledSteps:
        """Export, compile and check every bucket's graphs against eager (CompileError if
        any fails). ``keys`` and ``values`` are the cache the decode graphs will read
        (their shape is part of the graph); its last slot is the padding rows'."""
        if (reason := compiler_missing()) is not None:
            raise CompileError(reason)
        spare = keys.shape[1] - 1
        device = keys.device
        decode, windows = [], []
        with tempfile.TemporaryDirectory(prefix="chargpt-compile-") as tmp:
            for size in sizes:
                slots = torch.full((size,), spare, device=device)
                positions = torch.zeros(size, dtype=torch.long, device=device)
                key_positions = torch.full((size, keys.shape[3]), -1, device=device)
                key_positions[:, 0] = 0
                tokens = torch.zeros(size, dtype=torch.long, device=device)
                previous = torch.full((size,), -1, device=device)
                args = (tokens, previous, slots, positions, key_positions, keys, values)
                decode.append(_build(DecodeStep(model), args, Path(tmp, f"decode-{size}.pt2")))
                if not model.config.attention_window:
                    ids = torch.zeros((size, model.config.block_size), dtype=torch.long)
                    window = Path(tmp, f"window-{size}.pt2")
                    windows.append(_build(WindowStep(model), (ids.to(device),), window))
        return cls(sizes, decode, windows)

    def bucket(self, rows: int) -> int | None:
        """Index of the smallest bucket that holds ``rows``, or None (run eager)."""
        return next((i for i, size in enumerate(self.sizes) if size >= rows), None)

    def decode(self, index: int, *args: torch.Tensor) -> Sequence[torch.Tensor]:
        return self._decode[index](*args)

    def window(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        return self._windows[index](ids)[0]


def _build(step: nn.Module, args: tuple[torch.Tensor, ...], package: Path) -> Runner:
    """Export ``step`` at ``args``' shapes, compile it with AOTInductor, load it, and check
    that it computes what the eager module does on ``args``."""
    step.eval()
    try:
        with torch.inference_mode():
            expected = step(*args)
        exported = torch.export.export(step, args, strict=False)
        path = torch._inductor.aoti_compile_and_package(exported, package_path=str(package))
        # The package's loader, called with the flat list of inputs: the package's own
        # ``__call__`` adds a pytree flatten and unflatten, ~0.05 ms of a 0.4 ms step.
        run = torch._inductor.aoti_load_package(path).loader.run
        with torch.inference_mode():
            got = run(list(args))
    except Exception as exc:  # the compiler's own failure, whatever its type
        raise CompileError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from exc
    expected = _outputs(expected)
    for want, have in zip(expected, got, strict=True):
        error = (want.float() - have.float()).abs().max().item()
        if not error <= TOLERANCE:
            raise CompileError(f"the compiled graph differs from eager by {error:.3g}")
    return lambda *inputs: run(list(inputs))


def _outputs(out: torch.Tensor | Sequence[torch.Tensor]) -> Sequence[torch.Tensor]:
    """An eager step's outputs as a sequence (the window step returns one bare)."""
    return (out,) if isinstance(out, torch.Tensor) else out


def compile_steps(
    model: GPT, keys: torch.Tensor, values: torch.Tensor, max_rows: int
) -> CompiledSteps | None:
    """``CompiledSteps`` for buckets up to ``max_rows``, or None (with the reason logged)
    when this machine cannot compile them: the server then serves eager."""
    sizes = batch_sizes(max_rows)
    started = time.monotonic()
    try:
        steps = CompiledSteps.compile(model, keys, values, sizes)
    except CompileError as exc:
        log.warning("serving eager: the decode step could not be compiled: %s", exc)
        return None
    log.info(
        "compiled the decode step for batch sizes %s in %.1f s",
        ", ".join(map(str, sizes)), time.monotonic() - started,
    )  # fmt: skip
    return steps
