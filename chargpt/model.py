"""The character-level GPT: the lecture's model, and the options modern small models use.

The default is exactly the model of Karpathy's "Let's build GPT" lecture: token embedding +
learned position embedding, ``n_layer`` pre-LayerNorm blocks of multi-head causal
self-attention and a 4x ReLU feed-forward, a final LayerNorm and a linear head, N(0, 0.02)
initialisation, dropout on the attention weights, after the attention projection, after
the feed-forward and after the embeddings. The per-head key/query/value projections are
fused into one ``(3 * n_embd, n_embd)`` matrix (head ``h`` is rows ``h * head_size :
(h + 1) * head_size`` of each of the q, k and v thirds), so the lecture's weights map onto
it exactly (``bench/lecture.py``, ``tests/test_model.py``).

Options (``GPTConfig`` fields, stored in every checkpoint): rotary positions instead of a
position table, RMSNorm, squared-ReLU or GELU, QK-norm, tied embeddings, no biases, logit
soft-capping, sliding-window attention, and an exact bigram embedding.

Two meanings of "the model's context", both exact:

- No ``attention_window`` (the lecture's): the model sees the last ``block_size``
  characters. ``reference_generate`` crops the text to them and runs them from position 0;
  once a text is longer than the block, every new character needs that whole window again.
- ``attention_window`` W (rotary positions only): the text of any length is one causal
  forward in which every position attends to itself and the W - 1 before it, at every
  layer. Since rotary attention depends only on relative positions, keys and values once
  computed stay valid, so decoding keeps the last W of them per layer and appends one
  position per step (``server/decoder.py``), never recomputing anything.

``GPT.forward(idx, targets=None, kv_cache=None)`` serves training, sampling and scoring
alike: with a ``KVCache`` the new positions attend to the cached ones as well.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from chargpt.declare import Setting, setting, settings_of
from chargpt.sampling import SamplingParams, sample_next

POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
ACTIVATIONS = ("relu", "relu2", "gelu")
ROPE_BASE = 10_000.0


@dataclass(frozen=True)
class GPTConfig:
    """The architecture. Defaults are the lecture's (except ``vocab_size``, from the data).

    Each option is declared once here, with its help and range: ``chargpt train`` takes it
    as a flag (``trainer/config.py``) and ``GetModelInfo`` reports it.
    """

    vocab_size: int
    # block_size: the training sequence length; also the context without a window.
    block_size: int = setting(32, "Context length in characters.", minimum=1)
    n_embd: int = setting(64, "Embedding width.", minimum=1)
    n_head: int = setting(4, "Attention heads per layer (must divide --n-embd).", minimum=1)
    n_layer: int = setting(8, "Transformer blocks.", minimum=1)
    dropout: float = setting(0.0, "Dropout probability.", minimum=0, below=1)
    # Options beyond the lecture's model.
    position: str = setting(
        "learned",
        "Positions: a learned table (the lecture's) or rotary embeddings (rope) on queries "
        "and keys.",
        choices=POSITIONS,
    )
    norm: str = setting("layernorm", "Normalisation before each sublayer.", choices=NORMS)
    activation: str = setting(
        "relu", "Feed-forward activation (relu2 = squared ReLU).", choices=ACTIVATIONS
    )
    qk_norm: bool = setting(False, "RMS-normalise queries and keys per head before attention.")
    tie_embeddings: bool = setting(False, "The output head reuses the token embedding.")
    bias: bool = setting(True, "Biases in linear layers and LayerNorms.", negatable=True)
    logit_softcap: float = setting(
        0.0, "Soft-cap the logits at C: C * tanh(logits / C) (0 = off).", minimum=0
    )
    attention_window: int = setting(
        0,
        "Sliding-window attention: each position sees itself and the W - 1 before it "
        "(0 = off). Needs --position rope; at most --block-size.",
        minimum=0,
    )
    bigram_embedding: bool = setting(
        False,
        "Add a learned vector for each (previous, current) character pair to the token "
        "embedding: an exact bigram table, (vocab + 1) x vocab rows.",
    )

    def __post_init__(self) -> None:
        _check_int("vocab_size", self.vocab_size, minimum=1)
        for field, spec in settings_of(GPTConfig):  # the declared ranges, strictly typed
            _check_option(field.name, getattr(self, field.name), field.default, spec)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.position == "rope" and self.head_size % 2:
            raise ValueError(
                f"position rope needs an even head size, but n_embd / n_head = {self.head_size}"
            )
        if self.attention_window:
            if self.position != "rope":
                raise ValueError(
                    "attention_window needs position rope (with learned positions a sliding "
                    "window would change every position)"
                )
            if self.attention_window > self.block_size:
                raise ValueError(
                    f"attention_window ({self.attention_window}) must not exceed block_size "
                    f"({self.block_size}), the training sequence length"
                )

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @property
    def context(self) -> int:
        """Positions each position attends to: the window, else the whole block."""
        return self.attention_window or self.block_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GPTConfig:
        """The inverse of ``to_dict``; an option this version does not know is refused by
        name (a checkpoint from a newer chargpt), missing options take their defaults (a
        checkpoint from an older one)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown model option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                "(written by a newer chargpt?)"
            )
        return cls(**values)

    def describe(self) -> str:
        """One line for people: ``chargpt info``, ``GetModelInfo``."""
        parts = [
            f"{self.n_layer} layers, {self.n_head} heads, {self.n_embd}-wide",
            "rotary positions" if self.position == "rope" else "learned positions",
            f"sliding window {self.attention_window}" if self.attention_window else "",
            "pre-RMSNorm" if self.norm == "rmsnorm" else "pre-LayerNorm",
            {"relu": "ReLU", "relu2": "squared-ReLU", "gelu": "GELU"}[self.activation] + " MLP",
            "QK-norm" if self.qk_norm else "",
            "tied embeddings" if self.tie_embeddings else "",
            "" if self.bias else "no biases",
            f"logit soft-cap {self.logit_softcap:g}" if self.logit_softcap else "",
            "bigram embedding" if self.bigram_embedding else "",
        ]
        return "decoder-only transformer: " + ", ".join(p for p in parts if p)


def _check_option(name: str, value: Any, default: object, spec: Setting) -> None:
    """``value`` of the option ``name`` against its declaration; of its default's type."""
    if spec.choices is not None:
        if value not in spec.choices:
            raise ValueError(f"{name} must be one of {', '.join(spec.choices)}, got {value!r}")
    elif isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}")
    elif isinstance(default, int):
        _check_int(name, value, minimum=int(spec.minimum or 0))
        if spec.problem(value):  # a bound beyond the minimum
            raise ValueError(f"{name} {spec.problem(value)}, got {value!r}")
    elif not (isinstance(value, (int, float)) and spec.problem(value) is None):
        raise ValueError(f"{name} must be {_float_range(spec)}, got {value!r}")


def _float_range(spec: Setting) -> str:
    """What a float option must be: ``in [0, 1)`` between two bounds, else, say, ``a finite
    number >= 0``."""
    low = (spec.minimum, "[", ">=") if spec.above is None else (spec.above, "(", ">")
    high = (spec.maximum, "]", "<=") if spec.below is None else (spec.below, ")", "<")
    if low[0] is not None and high[0] is not None:
        return f"in {low[1]}{low[0]:g}, {high[0]:g}{high[1]}"
    bounds = [f" {sign} {bound:g}" for bound, _, sign in (low, high) if bound is not None]
    return "a finite number" + "".join(bounds)


def _check_int(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")


class KVCache(Protocol):
    """Keys and values of earlier positions, for a forward over the next positions of each
    row (``server/decoder.py`` keeps them in cache slots; tests keep them in lists)."""

    @property
    def positions(self) -> torch.Tensor:
        """(B, T) absolute position of each new character."""
        ...

    @property
    def key_positions(self) -> torch.Tensor | None:
        """(B, S) position of each key ``update`` returns, -1 for an empty entry; or None
        when every new position sees every key (one new position, a full window)."""
        ...

    @property
    def previous(self) -> torch.Tensor:
        """(B,) the character before each row's first new one, -1 for none (position 0);
        read by the bigram embedding only."""
        ...

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store this layer's new keys and values (B, H, T, hs); return the keys and values
        (B, H, S, hs) to attend over, in ``key_positions`` order."""
        ...


class Norm(nn.Module):
    """LayerNorm (bias optional) or RMSNorm."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.rms = config.norm == "rmsnorm"
        self.weight = nn.Parameter(torch.ones(config.n_embd))
        use_bias = config.bias and not self.rms
        self.bias = nn.Parameter(torch.zeros(config.n_embd)) if use_bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, self.weight.shape, self.weight, 1e-5)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, the heads' query/key/value projections fused."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None,
        layer: int,
        last_only: bool,
    ) -> torch.Tensor:
        """``x`` (B, T, C); ``mask`` (broadcastable to (B, H, T, S), True = visible) or None
        for plain causal attention. ``last_only``: the output of the last position only,
        (B, 1, C), though the keys and values still come from every position."""
        c = self.config
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, c.n_head, c.head_size).permute(2, 0, 3, 1, 4)
        qk, v = qkv[:2], qkv[2]  # (B, H, T, hs) each; queries and keys normalised together
        if c.qk_norm:
            qk = F.rms_norm(qk, (c.head_size,))
        if rotary is not None:
            qk = _rotate(qk, *rotary)
        q, k = qk.unbind(0)
        if kv_cache is not None:
            k, v = kv_cache.update(layer, k, v)
        if last_only:
            q, T = q[:, :, -1:], 1
            mask = None if mask is None else mask[..., -1:, :]
        # Without a mask: causal over T queries, or one last query that sees every key.
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=c.dropout if self.training else 0.0,
            is_causal=mask is None and T > 1,
        )
        return _dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)), c.dropout, self.training)


class MLP(nn.Module):
    """The 4x feed-forward: ReLU (the lecture's), squared ReLU or GELU."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.activation = config.activation
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.activation == "relu":
            h = torch.relu(h)
        elif self.activation == "relu2":
            h = torch.relu(h).square()
        else:
            h = F.gelu(h)
        return _dropout(self.proj(h), self.dropout, self.training)


def _dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    # (a plain function, not ``nn.Dropout`` modules: at p = 0, the default, it costs
    # nothing, where four module calls per block were a tenth of a batch-1 decode step)
    return F.dropout(x, p, training) if p and training else x


class Block(nn.Module):
    """Pre-norm residual block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln1 = Norm(config)
        self.attn = CausalSelfAttention(config)
        self.ln2 = Norm(config)
        self.ffwd = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor] | None,
        mask: torch.Tensor | None,
        kv_cache: KVCache | None = None,
        layer: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """``x`` (B, T, C) to (B, T, C), or (B, 1, C) with ``last_only``."""
        y = self.attn(self.ln1(x), rotary, mask, kv_cache, layer, last_only)
        x = (x[:, -1:] if last_only else x) + y
        return x + self.ffwd(self.ln2(x))


def _rotary(
    positions: torch.Tensor, head_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of each position's rotary angles, (T, hs), or (B, 1, T, hs) for
    per-row positions (B, T). Computed in float64 whatever the model's dtype, so that the
    angles of positions far past the block are as exact as those near 0."""
    exponents = torch.arange(0, head_size, 2, dtype=torch.float64, device=positions.device)
    angles = positions.to(torch.float64).unsqueeze(-1) * ROPE_BASE ** (-exponents / head_size)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    # Laid out for _rotate: (cos, cos) and (-sin, sin) over the head's two halves.
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)
    if positions.dim() == 2:  # broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return cos, sin


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: rotate each pair (x[i], x[i + hs/2]) by its position's angle,
    to (x[i] cos - x[i + hs/2] sin, x[i + hs/2] cos + x[i] sin), in four operations:
    ``roll`` swaps the two halves, and ``sin`` carries the sign."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class GPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = c = config
        self.token_embedding = nn.Embedding(c.vocab_size, c.n_embd)
        self.position_embedding = (
            nn.Embedding(c.block_size, c.n_embd) if c.position == "learned" else None
        )
        # Row previous * vocab + current; previous = vocab at a sequence's first position.
        self.bigram_embedding = (
            nn.Embedding((c.vocab_size + 1) * c.vocab_size, c.n_embd)
            if c.bigram_embedding
            else None
        )
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.n_layer))
        self.ln_f = Norm(c)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.n_embd, c.vocab_size, bias=c.bias)
        self.apply(_init_weights)
        if self.bigram_embedding is not None:
            # Zero: training starts from the plain token embedding and learns the pairs.
            nn.init.zeros_(self.bigram_embedding.weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T); mean cross-entropy if
        ``targets``.

        Without ``kv_cache`` the characters are positions 0 .. T-1 (T at most
        ``block_size`` with learned positions; any T with an attention window). With it,
        they follow the cached positions. ``last_only``: logits of the last position only,
        (B, 1, vocab), all that decoding needs; the last block then skips its attention
        output and MLP everywhere else.
        """
        c = self.config
        if kv_cache is None:
            length = idx.shape[1]
            if c.position == "learned" and length > c.block_size:
                raise ValueError(
                    f"sequence of {length} positions exceeds block_size {c.block_size}"
                )
            positions = torch.arange(length, device=idx.device)
            mask = _band(positions, positions, c.attention_window) if c.attention_window else None
        else:
            positions, key_positions = kv_cache.positions, kv_cache.key_positions
            mask = None
            if key_positions is not None:
                mask = _visible(positions, key_positions, c.attention_window)
        x = self.token_embedding(idx)
        if self.bigram_embedding is not None:
            first = (
                torch.full_like(idx[:, :1], -1) if kv_cache is None else kv_cache.previous[:, None]
            )
            previous = torch.cat((first, idx[:, :-1]), dim=1)
            previous = torch.where(previous < 0, c.vocab_size, previous)
            x = x + self.bigram_embedding(previous * c.vocab_size + idx)
        rotary = None
        if self.position_embedding is not None:
            x = x + self.position_embedding(positions)
        else:
            rotary = _rotary(positions, c.head_size, x.dtype)
        x = _dropout(x, c.dropout, self.training)
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x, rotary, mask, kv_cache, i, last_only and i == last)
        logits = self.head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        return logits, loss

    def head(self, x: torch.Tensor) -> torch.Tensor:
        if self.lm_head is None:
            logits = F.linear(x, self.token_embedding.weight)
        else:
            logits = F.linear(x, self.lm_head.weight, self.lm_head.bias)
        cap = self.config.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits


def _band(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(T, S) True where a query at ``query_pos`` sees a key at ``key_pos``: causal, and
    within ``window`` positions (itself and window - 1 before it)."""
    delta = query_pos.unsqueeze(-1) - key_pos.unsqueeze(-2)
    return (delta >= 0) & (delta < window)


def _visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """(B, 1, T, S) attention mask for cached keys (``key_pos`` -1: an empty entry)."""
    delta = query_pos.unsqueeze(-1) - key_pos.unsqueeze(-2)
    visible = (delta >= 0) & (key_pos >= 0).unsqueeze(-2)
    if window:
        visible &= delta < window
    return visible.unsqueeze(1)


def _init_weights(module: nn.Module) -> None:
    # The lecture's initialisation: N(0, 0.02) weights, zero biases.
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


@torch.inference_mode()
def reference_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    """Logits (vocab,) for the character after ``ids``, computed the obvious way: the
    lecture's crop to the last ``block_size`` characters, or, with an attention window,
    one banded forward over the whole text."""
    c = model.config
    context = ids if c.attention_window else ids[-c.block_size :]
    device = next(model.parameters()).device
    logits, _ = model(torch.tensor([context], device=device))
    return logits[0, -1].float().cpu()


def reference_generate(
    model: GPT,
    prompt: list[int],
    max_new_tokens: int,
    params: SamplingParams = SamplingParams(),
    seed: int = 0,
) -> list[int]:
    """The new tokens after ``prompt``, one full forward per character
    (``reference_logits``), sampled with ``seed`` by the function the server uses.

    Deliberately naive (no cache, no batching): it is the semantics that every faster path
    in this project is tested against.
    """
    ids = list(prompt)
    for index in range(max_new_tokens):
        logits = reference_logits(model, ids)
        ids.append(sample_next(logits, params, seed, index))
    return ids[len(prompt) :]
