"""Batched forward passes for serving, over a loaded ``chargpt.model.GPT``'s weights.

The served semantics are the seed's: the model sees the last ``block_size`` characters,
and the next character comes from the last position (``reference_generate``). Two exact
ways to get those logits for many rows at once:

- ``forward_windows``: run each row's window (right-padded to the longest; causal
  attention never lets a real position see padding) and compute the final layer only at
  each row's last real position. Optionally stores the rows' keys and values in the KV
  cache. Once a context is longer than ``block_size`` every step must do this: with
  learned absolute positions, sliding the window changes every position, so nothing is
  left to cache.
- ``forward_cached``: for rows whose whole context still fits the window, embed only the
  newest character and attend over the cached keys and values of the earlier ones.

Both reuse the model's own modules, so the weights have one home. Tests pin both to
``reference_generate`` and to the model's full forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from chargpt.model import GPT, Block


class KVCache:
    """Keys and values of ``slots`` rows: per layer, (slots, n_head, block_size, head_size)."""

    def __init__(self, model: GPT, slots: int) -> None:
        c = model.config
        param = next(model.parameters())
        shape = (c.n_layer, slots, c.n_head, c.block_size, c.head_size)
        self.keys = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.values = torch.zeros(shape, dtype=param.dtype, device=param.device)
        self.free = list(range(slots - 1, -1, -1))

    def allocate(self) -> int | None:
        return self.free.pop() if self.free else None

    def release(self, slot: int) -> None:
        self.free.append(slot)


def _feed_forward(block: Block, x: torch.Tensor) -> torch.Tensor:
    return x + block.ffwd(block.ln2(x))


class Decoder:
    """The serving forward passes of one loaded model (inference only)."""

    def __init__(self, model: GPT, cache_slots: int) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.cache = KVCache(model, cache_slots)

    @torch.inference_mode()
    def forward_windows(
        self,
        windows: list[list[int]],
        cache_slots: list[int | None] | None = None,
    ) -> torch.Tensor:
        """Logits (rows, vocab) for the character after each window (each at most
        ``block_size`` ids). Rows with a cache slot also store their keys and values."""
        model, c = self.model, self.config
        lengths = torch.tensor([len(w) for w in windows], device=self.device)
        T = max(len(w) for w in windows)
        ids = torch.zeros(len(windows), T, dtype=torch.long)
        for row, window in enumerate(windows):
            ids[row, : len(window)] = torch.tensor(window)
        ids = ids.to(self.device)
        fill = [(row, slot) for row, slot in enumerate(cache_slots or []) if slot is not None]
        x = model.embed(ids)
        rows = torch.arange(len(windows), device=self.device)
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.split_heads(block.ln1(x))
            for row, slot in fill:
                n = int(lengths[row])
                self.cache.keys[layer, slot, :, :n] = k[row, :, :n]
                self.cache.values[layer, slot, :, :n] = v[row, :, :n]
            if layer < c.n_layer - 1:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = x + attn.merge_heads(y)
                x = _feed_forward(block, x)
            else:
                # Last layer: only each row's last real position matters.
                last = lengths - 1
                q_last = q[rows, :, last].unsqueeze(2)  # (B, H, 1, hs)
                visible = torch.arange(T, device=self.device) <= last[:, None]
                y = F.scaled_dot_product_attention(
                    q_last, k, v, attn_mask=visible[:, None, None, :]
                )
                x = x[rows, last].unsqueeze(1) + attn.merge_heads(y)
                x = _feed_forward(block, x)
        return model.lm_head(model.ln_f(x[:, 0]))

    @torch.inference_mode()
    def forward_cached(
        self, tokens: list[int], positions: list[int], slots: list[int]
    ) -> torch.Tensor:
        """Logits (rows, vocab) after appending ``tokens[i]`` at ``positions[i]`` to the
        cached context in ``slots[i]`` (which must hold positions ``0 .. positions[i]-1``)."""
        model = self.model
        tok = torch.tensor(tokens, device=self.device)
        pos = torch.tensor(positions, device=self.device)
        slot = torch.tensor(slots, device=self.device)
        x = (model.token_embedding(tok) + model.position_embedding(pos))[:, None]  # (B, 1, C)
        visible = torch.arange(self.config.block_size, device=self.device) <= pos[:, None]
        mask = visible[:, None, None, :]
        for layer, block in enumerate(model.blocks):
            attn = block.attn
            q, k, v = attn.split_heads(block.ln1(x))  # each (B, H, 1, hs)
            keys, values = self.cache.keys[layer], self.cache.values[layer]
            keys[slot, :, pos] = k[:, :, 0]
            values[slot, :, pos] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, keys[slot], values[slot], attn_mask=mask)
            x = x + attn.merge_heads(y)
            x = _feed_forward(block, x)
        return model.lm_head(model.ln_f(x[:, 0]))
