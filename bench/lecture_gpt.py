"""The lecture's training run: its ``gpt.py`` with its defaults.

    python -m bench.lecture_gpt PATH_TO_TINY_SHAKESPEARE

Batch 16, block 32, 5000 iterations, learning rate 1e-3, an estimate of both losses from
200 random batches per split every 100 iterations (and at the last), 64 wide, 4 heads,
8 layers, no dropout; plain AdamW; then 500 sampled characters. The model is
``bench.lecture.PerHeadGPT``, the lecture's classes (one module per head).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from bench.lecture import PerHeadGPT
from chargpt.model import GPTConfig

batch_size = 16
block_size = 32
max_iters = 5000
eval_interval = 100
learning_rate = 1e-3
eval_iters = 200
n_embd = 64
n_head = 4
n_layer = 8
dropout = 0.0


def main() -> None:
    torch.manual_seed(1337)
    with open(sys.argv[1], encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    n = int(0.9 * len(data))
    splits = {"train": data[:n], "val": data[n:]}

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        d = splits[split]
        ix = torch.randint(len(d) - block_size, (batch_size,))
        x = torch.stack([d[i : i + block_size] for i in ix])
        y = torch.stack([d[i + 1 : i + block_size + 1] for i in ix])
        return x, y

    model = PerHeadGPT(GPTConfig(len(chars), block_size, n_embd, n_head, n_layer, dropout))

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        out = {}
        model.eval()
        for split in splits:
            losses = torch.zeros(eval_iters)
            for k in range(eval_iters):
                _, loss = model(*get_batch(split))
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    print(sum(p.numel() for p in model.parameters()) / 1e6, "M parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    for it in range(max_iters):
        if it % eval_interval == 0 or it == max_iters - 1:
            losses = estimate_loss()
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}",
                  flush=True)  # fmt: skip
        _, loss = model(*get_batch("train"))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    idx = torch.zeros((1, 1), dtype=torch.long)
    with torch.no_grad():
        for _ in range(500):
            logits, _ = model(idx[:, -block_size:])
            probs = F.softmax(logits[:, -1, :], dim=-1)
            idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    print("".join(chars[i] for i in idx[0].tolist()))


if __name__ == "__main__":
    main()
