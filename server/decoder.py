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

The block math is the model's, written with functional calls on the model's own
parameter tensors (no copies): at batch 1 the ``nn.Module`` call overhead was a fifth of
a decode step. Tests pin both paths to the model's forward and to ``reference_generate``.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class _Layer:
    """One block's parameters (the model's own tensors)."""

    ln1: tuple[torch.Tensor, torch.Tensor]
    qkv: torch.Tensor
    proj: tuple[torch.Tensor, torch.Tensor]
    ln2: tuple[torch.Tensor, torch.Tensor]
    fc: tuple[torch.Tensor, torch.Tensor]
    out: tuple[torch.Tensor, torch.Tensor]

    @classmethod
    def of(cls, block: Block) -> _Layer:
        fc, out = block.ffwd.net[0], block.ffwd.net[2]
        return cls(
            (block.ln1.weight, block.ln1.bias),
            block.attn.qkv.weight,
            (block.attn.proj.weight, block.attn.proj.bias),
            (block.ln2.weight, block.ln2.bias),
            (fc.weight, fc.bias),
            (out.weight, out.bias),
        )


class Decoder:
    """The serving forward passes of one loaded model (inference only)."""

    def __init__(self, model: GPT, cache_slots: int) -> None:
        self.model = model
        self.config = c = model.config
        self.device = next(model.parameters()).device
        self.cache = KVCache(model, cache_slots)
        self.layers = [_Layer.of(block) for block in model.blocks]
        self._shape = (c.n_embd,)
        self._eps = model.ln_f.eps

    def _qkv(self, layer: _Layer, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Pre-LayerNorm q, k, v of ``x`` (B, T, C), each (B, n_head, T, head_size)."""
        B, T, _ = x.shape
        h = F.layer_norm(x, self._shape, *layer.ln1, self._eps)
        qkv = F.linear(h, layer.qkv).view(B, T, 3, self.config.n_head, self.config.head_size)
        return tuple(qkv.permute(2, 0, 3, 1, 4).unbind(0))

    def _finish_block(self, layer: _Layer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Residual attention output ``y`` (B, n_head, T, hs), then the residual MLP."""
        B, _, T, _ = y.shape
        x = x + F.linear(y.transpose(1, 2).reshape(B, T, -1), *layer.proj)
        h = F.layer_norm(x, self._shape, *layer.ln2, self._eps)
        return x + F.linear(torch.relu(F.linear(h, *layer.fc)), *layer.out)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model
        h = F.layer_norm(x, self._shape, model.ln_f.weight, model.ln_f.bias, self._eps)
        return F.linear(h, model.lm_head.weight, model.lm_head.bias)

    @torch.inference_mode()
    def forward_windows(
        self,
        windows: list[list[int]],
        cache_slots: list[int | None] | None = None,
    ) -> torch.Tensor:
        """Logits (rows, vocab) for the character after each window (each at most
        ``block_size`` ids). Rows with a cache slot also store their keys and values."""
        model = self.model
        T = max(len(w) for w in windows)
        ids = torch.tensor([w + [0] * (T - len(w)) for w in windows], device=self.device)
        lengths = [len(w) for w in windows]
        last = torch.tensor(lengths, device=self.device) - 1
        rows = torch.arange(len(windows), device=self.device)
        fill = [(row, slot) for row, slot in enumerate(cache_slots or []) if slot is not None]
        x = model.token_embedding.weight[ids] + model.position_embedding.weight[:T]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x)
            for row, slot in fill:
                n = lengths[row]
                self.cache.keys[i, slot, :, :n] = k[row, :, :n]
                self.cache.values[i, slot, :, :n] = v[row, :, :n]
            if i < len(self.layers) - 1:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
                x = self._finish_block(layer, x, y)
            else:  # only each row's last real position matters from here on
                visible = torch.arange(T, device=self.device) <= last[:, None]
                q_last = q[rows, :, last].unsqueeze(2)  # (B, H, 1, hs)
                y = F.scaled_dot_product_attention(q_last, k, v, attn_mask=visible[:, None, None])
                x = self._finish_block(layer, x[rows, last].unsqueeze(1), y)
        return self._logits(x[:, 0])

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
        x = (model.token_embedding.weight[tok] + model.position_embedding.weight[pos])[:, None]
        visible = torch.arange(self.config.block_size, device=self.device) <= pos[:, None]
        mask = visible[:, None, None, :]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x)  # each (B, H, 1, hs)
            keys, values = self.cache.keys[i], self.cache.values[i]
            keys[slot, :, pos] = k[:, :, 0]
            values[slot, :, pos] = v[:, :, 0]
            y = F.scaled_dot_product_attention(q, keys[slot], values[slot], attn_mask=mask)
            x = self._finish_block(layer, x, y)
        return self._logits(x[:, 0])
