"""Turning a row of logits into the next token: temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1.0 mean no filtering."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filtered_log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Log-probabilities (last dim) after temperature, top-k and top-p; removed tokens get -inf.

    Works on any leading shape; float32 throughout.
    """
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        # Keep the smallest set of most likely tokens whose mass reaches top_p.
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop_sorted = cumulative - sorted_logits.softmax(dim=-1) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return F.log_softmax(logits, dim=-1)


def sample_with_log_probs(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> tuple[int, torch.Tensor]:
    """One token id from a 1-D row of logits, and the log-probabilities it was drawn from
    (greedy: the model's own distribution, at temperature 1)."""
    if params.greedy:
        return int(logits.argmax()), F.log_softmax(logits.float(), dim=-1)
    log_probs = filtered_log_probs(logits, params)
    return int(torch.multinomial(log_probs.exp(), 1, generator=generator)), log_probs


def sample_token(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> int:
    """One token id from a 1-D row of logits."""
    if params.greedy:
        return int(logits.argmax())
    return sample_with_log_probs(logits, params, generator)[0]
