"""Turning logits into the next character: temperature, top-k, top-p, and a counter-based
random draw.

``sample`` handles a whole batch in one vectorised pass. Its randomness for a row is a
uniform number computed from that request's seed and the index of the character being
drawn (a SplitMix64 hash, no generator state), so a request's text is the same alone or
in any batch, at any batch size; ``reference_generate``, ``chargpt sample`` and the server
all draw through it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK = (1 << 64) - 1


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0 means greedy; ``top_k`` 0 and ``top_p`` 1.0 mean no filtering."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampled(NamedTuple):
    tokens: torch.Tensor  # (B,) int64
    log_probs: torch.Tensor  # (B, vocab) float32: the distribution each token came from
    failed: torch.Tensor  # (B,) bool: the row's logits were not finite; its token is 0


def _mix64(x: int) -> int:
    """SplitMix64's finaliser on a 64-bit integer."""
    x = ((x ^ (x >> 30)) * _MIX1) & _MASK
    x = ((x ^ (x >> 27)) * _MIX2) & _MASK
    return x ^ (x >> 31)


def uniforms(seeds: Sequence[int], indices: Sequence[int]) -> torch.Tensor:
    """(B,) float64 in [0, 1): the draw for character ``indices[i]`` of the request seeded
    ``seeds[i]``. Element ``index`` of the SplitMix64 stream that starts at mix(seed).
    (Python integers: a few microseconds per row, faster than ~30 int64 tensor operations
    at any batch size the server runs.)"""
    draws = [
        (_mix64((_mix64(seed) + (index + 1) * _GOLDEN) & _MASK) >> 11) * 2.0**-53
        for seed, index in zip(seeds, indices, strict=True)
    ]
    return torch.tensor(draws, dtype=torch.float64)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    seeds: Sequence[int],
    indices: Sequence[int],
) -> Sampled:
    """One token per row of ``logits`` (B, vocab), each row with its own parameters, seed
    and character index.

    A row's result depends on nothing else in the batch: every operation is row-wise, and
    the draw is an inverse CDF in vocabulary order of the row's filtered distribution.
    Greedy rows take the argmax and report the model's own distribution (temperature 1).
    Any positive temperature is safe: the logits are shifted so their maximum is 0 before
    dividing, so a tiny temperature becomes greedy in the limit, never inf or NaN.
    """
    logits = logits.float()
    failed = ~torch.isfinite(logits).all(dim=-1)
    if failed.any():
        logits = logits.masked_fill(failed[:, None], 0.0)
    model_log_probs = F.log_softmax(logits, dim=-1)
    tokens = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        return Sampled(tokens, model_log_probs, failed)

    temperature = torch.tensor([p.temperature or 1.0 for p in params])[:, None]
    # Below float32's smallest normal number every temperature acts the same (greedy, ties
    # shared); clamping keeps one that rounds to 0 in float32 from dividing by zero.
    temperature = temperature.clamp(min=torch.finfo(torch.float32).tiny)
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    log_probs = F.log_softmax(_filter(scaled, params), dim=-1)
    cdf = log_probs.exp().to(torch.float64).cumsum(dim=-1)
    target = uniforms(seeds, indices)[:, None] * cdf[:, -1:]
    drawn = torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)
    if any(p.greedy for p in params):
        greedy = torch.tensor([p.greedy for p in params])
        drawn = torch.where(greedy, tokens, drawn)
        log_probs = torch.where(greedy[:, None], model_log_probs, log_probs)
    return Sampled(drawn.masked_fill(failed, 0), log_probs, failed)


def _filter(scaled: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p (over what top-k kept); removed entries become -inf."""
    vocab = scaled.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if all(k == vocab for k in ks) and all(p.top_p >= 1 for p in params):
        return scaled
    top_k, top_p = torch.tensor(ks), torch.tensor([p.top_p for p in params])
    ordered = scaled.sort(dim=-1, descending=True).values
    kth = ordered.gather(-1, (top_k - 1)[:, None])
    scaled = scaled.masked_fill(scaled < kth, float("-inf"))  # ties with the k-th stay
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    # Keep the smallest set of most likely characters whose mass reaches top_p: drop a
    # character when the mass before it already does (rows with top_p 1 drop nothing).
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    drop_sorted = (before >= top_p[:, None]) & (top_p < 1)[:, None]
    # The threshold is the smallest kept value; ties with it stay.
    kept = ordered.masked_fill(drop_sorted, float("inf")).amin(dim=-1, keepdim=True)
    return scaled.masked_fill(scaled < kept, float("-inf"))


def sample_next(logits: torch.Tensor, params: SamplingParams, seed: int, index: int) -> int:
    """The token drawn from one row of ``logits`` (vocab,) for character ``index`` of a
    request seeded ``seed``: ``sample`` for a batch of one."""
    return int(sample(logits[None], [params], [seed], [index]).tokens[0])
