"""The optimizer: AdamW with nanoGPT's parameter groups, or Muon for the blocks' weight
matrices beside AdamW for the rest. Its settings are applied when it is made and again
after a resumed run loads its state (whose saved parameter groups would otherwise win)."""

from __future__ import annotations

from typing import Any

import torch

from chargpt.model import GPT
from trainer.config import TrainConfig


class Optimizers:
    """AdamW, with Muon beside it under ``--optimizer muon``: stepped, cleared, scheduled
    and saved as one. Muon takes the 2-D weight matrices inside the transformer blocks
    (attention and feed-forward); AdamW takes everything else (embeddings, the head,
    norms, biases), with weight decay on its matrices only (nanoGPT's grouping)."""

    def __init__(self, model: GPT, cfg: TrainConfig, device: torch.device) -> None:
        named = dict(model.named_parameters())
        hidden = {
            name
            for name, p in named.items()
            if cfg.optimizer == "muon" and p.dim() == 2 and name.startswith("blocks.")
        }
        rest = [p for n, p in named.items() if n not in hidden]
        groups = [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ]
        fused = device.type in ("cpu", "cuda")
        self.adamw = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(0.9, 0.99), fused=fused)
        # Muon orthogonalises each matrix's update (``muon_ns_steps`` of Newton-Schulz),
        # scaled by sqrt(max(1, rows / cols)) ("original"); its weight decay is decoupled.
        self.muon = (
            Muon(
                [named[n] for n in named if n in hidden],
                lr=cfg.muon_learning_rate,
                weight_decay=cfg.muon_weight_decay,
                ns_steps=cfg.muon_ns_steps,
                adjust_lr_fn="original",
                orthogonalize_dtype=orthogonalize_dtype(device),
            )
            if hidden
            else None
        )
        self.muon_scale = cfg.muon_learning_rate / cfg.learning_rate

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"adamw": self.adamw} | ({"muon": self.muon} if self.muon else {})

    def set_learning_rate(self, lr: float) -> None:
        """AdamW's learning rate ``lr``, and Muon's on the same curve at its own peak."""
        for group in self.adamw.param_groups:
            group["lr"] = lr
        if self.muon is not None:
            for group in self.muon.param_groups:
                group["lr"] = lr * self.muon_scale

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, states: dict[str, Any], cfg: TrainConfig) -> None:
        """The saved states, then ``cfg``'s settings (the saved groups carry the old ones)."""
        for name, optimizer in self.optimizers.items():
            optimizer.load_state_dict(states[name])
        decay, _ = self.adamw.param_groups
        decay["weight_decay"] = cfg.weight_decay
        if self.muon is not None:
            for group in self.muon.param_groups:
                group["weight_decay"] = cfg.muon_weight_decay
                group["ns_steps"] = cfg.muon_ns_steps
        self.muon_scale = cfg.muon_learning_rate / cfg.learning_rate


def orthogonalize_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where the hardware multiplies it natively (CUDA; a CPU with AVX512-BF16 or
    AMX), float32 elsewhere: on an AVX2-only CPU a bfloat16 matrix product is emulated,
    and Newton-Schulz in bfloat16 took 80% of a cpu-10min step (a 512x128 @ 128x128
    product: 6.3 ms in bfloat16, 0.14 ms in float32)."""
    if device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return torch.bfloat16


class Muon(torch.optim.Muon):
    """torch's Muon (same update, settings and state) with its Newton-Schulz
    orthogonalisation in ``orthogonalize_dtype`` instead of always bfloat16."""

    def __init__(self, params: Any, *, orthogonalize_dtype: torch.dtype, **settings: Any) -> None:
        super().__init__(params, **settings)
        if self.defaults["adjust_lr_fn"] not in (None, "original"):
            raise ValueError("this Muon scales its step the original way only")
        self.orthogonalize_dtype = orthogonalize_dtype

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                update = newton_schulz(
                    update.to(self.orthogonalize_dtype),
                    group["ns_coefficients"],
                    group["ns_steps"],
                    group["eps"],
                )
                rows, cols = p.shape  # adjust_lr_fn "original": sqrt(max(1, rows / cols))
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * max(1.0, rows / cols) ** 0.5)


def newton_schulz(
    g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float
) -> torch.Tensor:
    """The quintic Newton-Schulz iteration of Keller Jordan's Muon (as torch's): ``g``
    mapped close to the orthogonal matrix of its polar decomposition, in ``g``'s dtype."""
    a, b, c = coefficients
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.size(0) > g.size(1) else x
