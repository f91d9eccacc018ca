"""The optimizer: AdamW with nanoGPT's parameter groups. Its settings are applied when it
is made and again after a resumed run loads its state (whose saved parameter groups would
otherwise win)."""

from __future__ import annotations

import torch

from chargpt.model import GPT
from trainer.config import TrainConfig


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (nanoGPT's grouping), fused kernel where
    PyTorch has one for the device."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.99), fused=fused)


def apply_settings(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Set ``cfg``'s optimizer settings on ``optimizer``'s groups (the learning rate is set
    at every step from the schedule)."""
    decay, _ = optimizer.param_groups
    decay["weight_decay"] = cfg.weight_decay
