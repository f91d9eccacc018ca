"""Serving one loaded model: cache slots, and packing rows into forward passes (rows that
append to their KV cache; rows that recompute a window; prompt chunks). The transformer itself is
``chargpt.model.GPT.forward``; this module only feeds it.

A sequence's keys and values live in a cache slot: per layer, ``context`` positions
(the attention window, or the block without one), position p at index p % context.

- A windowed model (rotary positions, ``attention_window`` W) keeps every sequence in its
  slot for good: each step appends one position and overwrites the one that just left
  the window. Nothing is ever recomputed, at any length.
- A model without a window (the lecture's crop semantics) uses its slot while the text
  still fits the block. Once it is longer, the window slides, every position changes, and
  each step recomputes the last ``block_size`` characters from position 0: all such rows
  have exactly ``block_size`` tokens, so they batch without padding.

Slots are kept compact (0 .. n-1 in use): a released slot takes the last one's contents,
so a decode step over every cached sequence attends to a view of the cache, not a copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from chargpt.model import GPT
from server.compiled import compile_steps
from server.served import Row, ScoreWork


class SlotCache:
    """Keys and values of up to ``slots`` sequences, and the position in each entry;
    ``spare`` more slots that no sequence gets (a compiled step's padding rows use one)."""

    def __init__(self, model: GPT, slots: int, spare: int = 0) -> None:
        c = model.config
        param = next(model.parameters())
        self.width = c.context
        self.capacity = slots
        shape = (c.n_layer, slots + spare, c.n_head, self.width, c.head_size)
        self.keys = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.values = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.positions = torch.full((slots + spare, self.width), -1, device=param.device)
        self.owners: list[int] = []  # owners[slot]: the sequence in it

    def allocate(self, owner: int) -> int | None:
        if len(self.owners) == self.capacity:
            return None
        self.owners.append(owner)
        slot = len(self.owners) - 1
        self.positions[slot] = -1
        return slot

    def release(self, slot: int) -> int | None:
        """Free ``slot``; the last slot's contents move into it. Returns the moved owner."""
        last = len(self.owners) - 1
        moved = None
        if slot != last:
            self.keys[:, slot] = self.keys[:, last]
            self.values[:, slot] = self.values[:, last]
            self.positions[slot] = self.positions[last]
            moved = self.owners[slot] = self.owners[last]
        self.owners.pop()
        return moved


class DecodeView:
    """``chargpt.model.KVCache`` for one new position in each of B slots: the new keys and
    values are written first, then every row attends over its whole slot."""

    def __init__(
        self,
        cache: SlotCache,
        slots: torch.Tensor,
        positions: torch.Tensor,
        previous: torch.Tensor,
        full: bool,
    ) -> None:
        """``previous``: the character before each new one (-1 at position 0). ``full``:
        every slot holds ``width`` positions after this one is written, so (the slot being
        the attention window) the new position sees every key: no mask."""
        self.cache = cache
        self.slots = slots
        self.previous = previous
        self.columns = positions % cache.width
        cache.positions[slots, self.columns] = positions
        self.positions = positions[:, None]
        # Slots 0 .. B-1 in order: attend to a view of the cache, no copy.
        self.contiguous = bool(torch.equal(slots, torch.arange(len(slots), device=slots.device)))
        self.key_positions = None if full else self._rows(cache.positions)

    def _rows(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor[: len(self.slots)] if self.contiguous else tensor[self.slots]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        keys[self.slots, :, self.columns] = k[:, :, 0]
        values[self.slots, :, self.columns] = v[:, :, 0]
        return self._rows(keys), self._rows(values)


class ChunkView:
    """``chargpt.model.KVCache`` for ``count`` new positions in each of B slots (from each
    slot's own start): they attend to what the slot held plus each other, and the last
    ``width`` of them are stored. ``previous``: the character before each row's start
    (-1 at position 0)."""

    def __init__(
        self, cache: SlotCache, slots: list[int], starts: list[int], previous: list[int], count: int
    ) -> None:
        device = cache.positions.device
        self.cache = cache
        self.slots = torch.tensor(slots, device=device)
        self.previous = torch.tensor(previous, device=device)
        offsets = torch.arange(count, device=device)
        self.positions = torch.tensor(starts, device=device)[:, None] + offsets  # (B, T)
        self.key_positions = torch.cat((cache.positions[self.slots], self.positions), dim=1)
        kept = self.positions[:, -cache.width :]
        self.columns = kept % cache.width
        self.kept = kept.shape[1]
        cache.positions[self.slots[:, None], self.columns] = kept

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        keys, values = self.cache.keys[layer], self.cache.values[layer]
        out = (torch.cat((keys[self.slots], k), dim=2), torch.cat((values[self.slots], v), dim=2))
        rows = self.slots[:, None]  # with columns (B, kept): entries (B, kept, H, hs)
        keys[rows, :, self.columns] = k[:, :, -self.kept :].transpose(1, 2)
        values[rows, :, self.columns] = v[:, :, -self.kept :].transpose(1, 2)
        return out


class Decoder:
    """The serving forward passes of one loaded model (inference only). It executes the
    engine's plan: which rows append to their cache and which recompute a window is the
    schedule's decision (``server.served.decodes_from_cache``), and how far each row is
    computed is the row's own ``computed`` count, which the engine advances.

    With ``compile``, decode steps and window recomputes run compiled graphs
    (``server/compiled.py``), eager where this machine cannot compile them; prompts and
    Scores always run eager (their lengths vary)."""

    def __init__(self, model: GPT, slots: int, compile: bool = False) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.cache = SlotCache(model, slots, spare=1 if compile else 0)
        self.compiled = (
            compile_steps(model, self.cache.keys, self.cache.values, slots) if compile else None
        )
        self.slot_of: dict[int, int] = {}
        self._score_caches: dict[int, tuple[SlotCache, int]] = {}

    # ---- sequences -------------------------------------------------------------------

    def start(self, seq: Row) -> None:
        """Take a cache slot for a sequence that will decode from the cache."""
        slot = self.cache.allocate(seq.id)
        if slot is None:
            raise RuntimeError("no free cache slot (more sequences than --max-running)")
        self.slot_of[seq.id] = slot

    def release(self, seq_id: int) -> None:
        slot = self.slot_of.pop(seq_id, None)
        if slot is not None:
            moved = self.cache.release(slot)
            if moved is not None:
                self.slot_of[moved] = slot

    # ---- forward passes --------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, chunks: Sequence[tuple[Row, int]]) -> list[torch.Tensor | None]:
        """Process positions ``computed .. computed + count`` of each sequence into its
        slot; chunks of the same length share one forward. For each sequence whose last
        position is now done, the logits (vocab,) for the character after it."""
        out: list[torch.Tensor | None] = [None] * len(chunks)
        by_length: dict[int, list[int]] = {}
        for i, (seq, count) in enumerate(chunks):
            if not 1 <= count <= len(seq.tokens) - seq.computed:
                raise ValueError(
                    f"chunk of {count} positions for a sequence with "
                    f"{len(seq.tokens) - seq.computed} pending"
                )
            by_length.setdefault(count, []).append(i)
        for count, rows in by_length.items():
            seqs = [chunks[i][0] for i in rows]
            starts = [s.computed for s in seqs]
            slots = [self.slot_of[s.id] for s in seqs]
            previous = [_before(s.tokens, a) for s, a in zip(seqs, starts, strict=True)]
            view = ChunkView(self.cache, slots, starts, previous, count)
            ids = [s.tokens[a : a + count] for s, a in zip(seqs, starts, strict=True)]
            logits = self._forward(ids, view, last_only=True)
            for i, seq, start, row in zip(rows, seqs, starts, logits, strict=True):
                if start + count == len(seq.tokens):
                    out[i] = row[-1]
        return out

    @torch.inference_mode()
    def decode(self, seqs: Sequence[Row]) -> torch.Tensor:
        """Logits (len(seqs), vocab) for the character after each sequence, whose newest
        token is the only one not yet in its slot: one position each, appended."""
        if self.compiled is not None and (bucket := self.compiled.bucket(len(seqs))) is not None:
            return self._decode_compiled(seqs, bucket)
        slots = torch.tensor([self.slot_of[s.id] for s in seqs], device=self.device)
        order = torch.argsort(slots)
        ends = [len(s.tokens) for s in seqs]
        positions = torch.tensor(ends, device=self.device) - 1
        tokens = torch.tensor([s.tokens[-1] for s in seqs], device=self.device)
        before = [_before(s.tokens, end - 1) for s, end in zip(seqs, ends, strict=True)]
        previous = torch.tensor(before, device=self.device)
        # A window model's slot is its window: once full, each new position sees it all.
        full = bool(self.config.attention_window) and min(ends) >= self.cache.width
        view = DecodeView(self.cache, slots[order], positions[order], previous[order], full)
        logits, _ = self.model(tokens[order, None], kv_cache=view)
        return logits[torch.argsort(order), -1]

    @torch.inference_mode()
    def recompute(self, seqs: Sequence[Row]) -> torch.Tensor:
        """Logits (len(seqs), vocab) of each sequence's last ``block_size`` characters from
        position 0 (the lecture's crop): every row has exactly that many, so they batch
        without padding (a compiled graph pads the batch, not the rows, to its size)."""
        block = self.config.block_size
        windows = [s.tokens[-block:] for s in seqs]
        if self.compiled is not None and (bucket := self.compiled.bucket(len(seqs))) is not None:
            padding = self.compiled.sizes[bucket] - len(seqs)
            ids = torch.tensor(windows + [[0] * block] * padding, device=self.device)
            return self.compiled.window(bucket, ids)[: len(seqs)]
        logits, _ = self.model(torch.tensor(windows, device=self.device), last_only=True)
        return logits[:, -1]

    def _decode_compiled(self, seqs: Sequence[Row], bucket: int) -> torch.Tensor:
        """``decode`` through the bucket's compiled graph: padding rows (token 0 at position
        0) use the spare slot, and only the real rows' new keys and values are stored."""
        assert self.compiled is not None
        cache, rows = self.cache, len(seqs)
        padding = self.compiled.sizes[bucket] - rows
        spare = cache.capacity
        slots, positions, tokens, previous = torch.tensor(
            [
                [self.slot_of[s.id] for s in seqs] + [spare] * padding,
                [len(s.tokens) - 1 for s in seqs] + [0] * padding,
                [s.tokens[-1] for s in seqs] + [0] * padding,
                [_before(s.tokens, len(s.tokens) - 1) for s in seqs] + [-1] * padding,
            ],
            device=self.device,
        )
        columns = positions % cache.width
        cache.positions[slots, columns] = positions
        logits, keys, values = self.compiled.decode(
            bucket,
            tokens, previous, slots, positions, cache.positions[slots], cache.keys, cache.values,
        )  # fmt: skip
        # Indexing dims 1 and 3 puts the rows first: entries (rows, n_layer, H, hs).
        cache.keys[:, slots[:rows], :, columns[:rows]] = keys[:, :rows].transpose(0, 1)
        cache.values[:, slots[:rows], :, columns[:rows]] = values[:, :rows].transpose(0, 1)
        return logits[:rows]

    def _forward(self, ids: list[list[int]], view: ChunkView, last_only: bool) -> torch.Tensor:
        idx = torch.tensor(ids, device=self.device)
        logits, _ = self.model(idx, kv_cache=view, last_only=last_only)
        return logits

    # ---- scoring ---------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, job: ScoreWork, budget: int) -> tuple[list[float], int]:
        """Log-probabilities of the next targets of ``job`` (each given everything before
        it, under the model's semantics), and the positions computed: about ``budget``."""
        ids, first, target = job.ids, job.first_target, job.next_target
        if self.config.attention_window:
            return self._score_through_cache(job.id, ids, first, budget)
        block = self.config.block_size
        if target <= block:  # targets whose window starts at 0: one causal forward
            end = min(len(ids), block + 1)
            logits, _ = self.model(torch.tensor([ids[: end - 1]], device=self.device))
            log_probs = torch.log_softmax(logits[0].float(), dim=-1).cpu()
            return [float(log_probs[i - 1, ids[i]]) for i in range(target, end)], end - 1
        end = min(len(ids), target + max(1, budget // block))
        windows = torch.tensor([ids[i - block : i] for i in range(target, end)])
        logits, _ = self.model(windows.to(self.device), last_only=True)
        log_probs = torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()
        scores = [float(log_probs[j, ids[i]]) for j, i in enumerate(range(target, end))]
        return scores, len(scores) * block

    def _score_through_cache(
        self, job_id: int, ids: list[int], first_target: int, budget: int
    ) -> tuple[list[float], int]:
        """A windowed model: the next chunk of the text through the job's own one-slot
        cache; logits at every position of it, kept for the targets past the context."""
        if job_id not in self._score_caches:
            cache = SlotCache(self.model, 1)
            cache.allocate(job_id)
            self._score_caches[job_id] = (cache, 0)
        cache, start = self._score_caches[job_id]
        end = min(len(ids) - 1, start + max(1, budget))  # targets start + 1 .. end
        context_only = end < first_target
        view = ChunkView(cache, [0], [start], [_before(ids, start)], end - start)
        logits = self._forward([ids[start:end]], view, last_only=context_only)[0]
        self._score_caches[job_id] = (cache, end)
        if context_only:
            return [], end - start
        log_probs = torch.log_softmax(logits.float(), dim=-1).cpu()
        targets = range(start + 1, end + 1)
        scores = [float(log_probs[j, ids[i]]) for j, i in enumerate(targets) if i >= first_target]
        return scores, end - start

    def finish_score(self, job_id: int) -> None:
        self._score_caches.pop(job_id, None)


def _before(tokens: Sequence[int], position: int) -> int:
    """The character before ``position`` of ``tokens``, -1 at position 0."""
    return tokens[position - 1] if position else -1
