"""The lecture's model exactly as the lecture writes it: one module per attention head,
``nn.Sequential`` feed-forward, N(0, 0.02) initialisation.

It is the straightforward oracle that the fused model in ``chargpt.model`` is tested
(``tests/test_model.py``) and benchmarked (``bench/``) against. ``fused_state_dict`` maps
its weights onto ``chargpt.model.GPT``; ``per_head_state_dict`` maps them back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chargpt.model import GPTConfig


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class Head(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.key = nn.Linear(config.n_embd, config.head_size, bias=False)
        self.query = nn.Linear(config.n_embd, config.head_size, bias=False)
        self.value = nn.Linear(config.n_embd, config.head_size, bias=False)
        self.register_buffer("tril", torch.tril(torch.ones(config.block_size, config.block_size)))
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[1]
        k = self.key(x)
        q = self.query(x)
        wei = q @ k.transpose(-2, -1) * k.shape[-1] ** -0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float("-inf"))
        wei = self.dropout(F.softmax(wei, dim=-1))
        return wei @ self.value(x)


class FeedForward(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(config.n_embd, 4 * config.n_embd),
            nn.ReLU(),
            nn.Linear(4 * config.n_embd, config.n_embd),
            nn.Dropout(config.dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MultiHeadAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.heads = nn.ModuleList(Head(config) for _ in range(config.n_head))
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        return self.dropout(self.proj(out))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.sa = MultiHeadAttention(config)
        self.ffwd = FeedForward(config)
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.ln2 = nn.LayerNorm(config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.sa(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class PerHeadGPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding_table = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding_table = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.Sequential(*[Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(_init_weights)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = idx.shape[1]
        tok_emb = self.token_embedding_table(idx)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))
        x = self.blocks(tok_emb + pos_emb)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


# (fused GPT name, per-head model name) of the parameters both models share per block.
_SHARED_BLOCK_PARAMS = [
    ("attn.proj", "sa.proj"),
    ("ln1", "ln1"),
    ("ln2", "ln2"),
    ("ffwd.fc", "ffwd.net.0"),
    ("ffwd.proj", "ffwd.net.2"),
]
_SHARED_PARAMS = [
    ("token_embedding.weight", "token_embedding_table.weight"),
    ("position_embedding.weight", "position_embedding_table.weight"),
    ("ln_f.weight", "ln_f.weight"),
    ("ln_f.bias", "ln_f.bias"),
    ("lm_head.weight", "lm_head.weight"),
    ("lm_head.bias", "lm_head.bias"),
]


def _shared_names(n_layer: int) -> list[tuple[str, str]]:
    names = list(_SHARED_PARAMS)
    for i in range(n_layer):
        for fused, lecture in _SHARED_BLOCK_PARAMS:
            for kind in ("weight", "bias"):
                names.append((f"blocks.{i}.{fused}.{kind}", f"blocks.{i}.{lecture}.{kind}"))
    return names


def fused_state_dict(per_head: PerHeadGPT) -> dict[str, torch.Tensor]:
    """The per-head model's weights in ``chargpt.model.GPT``'s layout."""
    sd = per_head.state_dict()
    out = {fused: sd[lecture] for fused, lecture in _shared_names(per_head.config.n_layer)}
    for i, block in enumerate(per_head.blocks):
        heads = block.sa.heads
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [
                torch.cat([getattr(h, name).weight for h in heads])
                for name in ("query", "key", "value")
            ]
        ).detach()
    return out


def per_head_state_dict(fused: nn.Module) -> dict[str, torch.Tensor]:
    """A ``chargpt.model.GPT``'s weights in the per-head model's layout (the inverse)."""
    config: GPTConfig = fused.config  # type: ignore[assignment]
    sd = fused.state_dict()
    out = {lecture: sd[name] for name, lecture in _shared_names(config.n_layer)}
    hs = config.head_size
    for i in range(config.n_layer):
        thirds = sd[f"blocks.{i}.attn.qkv.weight"].split(config.n_embd)
        for part, name in zip(thirds, ("query", "key", "value"), strict=True):
            for h in range(config.n_head):
                out[f"blocks.{i}.sa.heads.{h}.{name}.weight"] = part[h * hs : (h + 1) * hs]
        for h in range(config.n_head):
            out[f"blocks.{i}.sa.heads.{h}.tril"] = torch.tril(
                torch.ones(config.block_size, config.block_size)
            )
    return out
