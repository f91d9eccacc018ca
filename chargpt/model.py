"""The character-level GPT of Karpathy's "Let's build GPT" lecture.

Token embedding + learned position embedding, ``n_layer`` pre-LayerNorm blocks of
multi-head causal self-attention and a 4x ReLU feed-forward, a final LayerNorm and a
linear head. Dropout sits where the lecture puts it: on the attention weights, after the
attention projection, after the feed-forward and after the embeddings.

The only departure from the lecture is mechanical: the per-head key/query/value
projections are fused into one ``(n_embd, 3 * n_embd)`` matrix and attention runs through
``scaled_dot_product_attention``. Head ``h`` of the fused layout is rows
``h * head_size : (h + 1) * head_size`` of each of the q, k and v thirds, so a per-head
model's weights map onto it exactly (``tests/test_model.py`` checks this).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from chargpt.sampling import SamplingParams, sample_token


@dataclass(frozen=True)
class GPTConfig:
    """Hyperparameters that define the architecture (the seed's defaults)."""

    vocab_size: int
    block_size: int = 32
    n_embd: int = 64
    n_head: int = 4
    n_layer: int = 8
    dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict[str, int | float]:
        return asdict(self)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        self.proj_dropout = nn.Dropout(config.dropout)

    def split_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project ``x`` (B, T, C) to q, k, v, each (B, n_head, T, head_size)."""
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def merge_heads(self, y: torch.Tensor) -> torch.Tensor:
        """(B, n_head, T, head_size) -> projected (B, T, C)."""
        B, _, T, _ = y.shape
        return self.proj_dropout(self.proj(y.transpose(1, 2).reshape(B, T, -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.split_heads(x)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        return self.merge_heads(y)


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


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln2 = nn.LayerNorm(config.n_embd)
        self.ffwd = FeedForward(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ffwd(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.n_embd)
        self.position_embedding = nn.Embedding(config.block_size, config.n_embd)
        self.embedding_dropout = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size)
        self.apply(_init_weights)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def embed(self, idx: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """Token plus position embeddings for positions ``start_pos .. start_pos + T``."""
        T = idx.shape[1]
        if start_pos + T > self.config.block_size:
            raise ValueError(
                f"sequence of {start_pos + T} positions exceeds block_size {self.config.block_size}"
            )
        pos = torch.arange(start_pos, start_pos + T, device=idx.device)
        return self.embedding_dropout(self.token_embedding(idx) + self.position_embedding(pos))

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T); mean cross-entropy if ``targets``."""
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def _init_weights(module: nn.Module) -> None:
    # The lecture's initialisation: N(0, 0.02) weights, zero biases.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


@torch.inference_mode()
def reference_generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    generator: torch.Generator | None = None,
) -> list[int]:
    """The seed's ``generate``: crop the context to the last ``block_size`` tokens, run the
    whole window, sample the next token from the last position. Returns the new tokens.

    Deliberately naive (no cache, no batching): it is the semantics that every faster path
    in this project is tested against. Sampling happens on the CPU with ``generator``.
    """
    device = next(model.parameters()).device
    ids = list(prompt)
    for _ in range(max_new_tokens):
        context = torch.tensor([ids[-model.config.block_size :]], device=device)
        logits, _ = model(context)
        ids.append(sample_token(logits[0, -1].float().cpu(), params, generator))
    return ids[len(prompt) :]
