"""The architecture options against a naive re-implementation: explicit per-position
attention loops, the norms written out, rotary positions as complex rotations."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from chargpt.checkpoint import CheckpointError, CheckpointInfo, load_checkpoint, save_checkpoint
from chargpt.model import GPT, GPTConfig, reference_logits

BASE = GPTConfig(vocab_size=11, block_size=10, n_embd=16, n_head=2, n_layer=2)
OPTIONS = {
    "lecture": {},
    "rope": {"position": "rope"},
    "rmsnorm": {"norm": "rmsnorm"},
    "relu2": {"activation": "relu2"},
    "gelu": {"activation": "gelu"},
    "qk_norm": {"qk_norm": True},
    "tied": {"tie_embeddings": True},
    "no_bias": {"bias": False},
    "softcap": {"logit_softcap": 2.0},
    "window": {"position": "rope", "attention_window": 3},
    "bigram": {"bigram_embedding": True},
    "everything": {
        "position": "rope", "norm": "rmsnorm", "activation": "relu2", "qk_norm": True,
        "tie_embeddings": True, "bias": False, "logit_softcap": 5.0, "attention_window": 4,
        "bigram_embedding": True,
    },
}  # fmt: skip


def random_model(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.4)
    return model


def naive_logits(model: GPT, ids: list[int]) -> torch.Tensor:
    """(T, vocab), written the long way from the model's weights."""
    c = model.config
    w = {k: v.double() for k, v in model.state_dict().items()}
    T, hs, half = len(ids), c.head_size, c.head_size // 2

    def norm(x: torch.Tensor, name: str) -> torch.Tensor:
        if c.norm == "rmsnorm":
            return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * w[f"{name}.weight"]
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        out = (x - mean) / torch.sqrt(var + 1e-5) * w[f"{name}.weight"]
        return out + w[f"{name}.bias"] if c.bias else out

    def linear(x: torch.Tensor, name: str) -> torch.Tensor:
        out = x @ w[f"{name}.weight"].T
        return out + w[f"{name}.bias"] if f"{name}.bias" in w else out

    def rotate(x: torch.Tensor, position: int) -> torch.Tensor:
        z = torch.complex(x[:half], x[half:])
        angles = position * 10_000.0 ** (-torch.arange(half, dtype=torch.float64) * 2 / hs)
        z = z * torch.polar(torch.ones_like(angles), angles)
        return torch.cat((z.real, z.imag))

    x = w["token_embedding.weight"][ids]
    if c.bigram_embedding:  # row (previous, current); previous "none" (= vocab) at position 0
        pairs = [(ids[i - 1] if i else c.vocab_size) * c.vocab_size + ids[i] for i in range(T)]
        x = x + w["bigram_embedding.weight"][pairs]
    if c.position == "learned":
        x = x + w["position_embedding.weight"][:T]
    for layer in range(c.n_layer):
        p = f"blocks.{layer}"
        q, k, v = linear(norm(x, f"{p}.ln1"), f"{p}.attn.qkv").split(c.n_embd, dim=-1)
        heads = []
        for h in range(c.n_head):
            qh, kh, vh = (t[:, h * hs : (h + 1) * hs] for t in (q, k, v))
            if c.qk_norm:
                eps = torch.finfo(torch.float32).eps
                qh = qh / torch.sqrt((qh * qh).mean(-1, keepdim=True) + eps)
                kh = kh / torch.sqrt((kh * kh).mean(-1, keepdim=True) + eps)
            if c.position == "rope":
                qh = torch.stack([rotate(qh[i], i) for i in range(T)])
                kh = torch.stack([rotate(kh[i], i) for i in range(T)])
            out = torch.zeros(T, hs, dtype=torch.float64)
            for i in range(T):
                first = max(0, i - c.attention_window + 1) if c.attention_window else 0
                scores = torch.tensor([qh[i] @ kh[j] / math.sqrt(hs) for j in range(first, i + 1)])
                out[i] = torch.softmax(scores, dim=0) @ vh[first : i + 1]
            heads.append(out)
        x = x + linear(torch.cat(heads, dim=-1), f"{p}.attn.proj")
        hidden = linear(norm(x, f"{p}.ln2"), f"{p}.ffwd.fc")
        hidden = {
            "relu": torch.relu(hidden),
            "relu2": torch.relu(hidden) ** 2,
            "gelu": 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2))),
        }[c.activation]
        x = x + linear(hidden, f"{p}.ffwd.proj")
    x = norm(x, "ln_f")
    logits = x @ w["token_embedding.weight"].T if c.tie_embeddings else linear(x, "lm_head")
    if c.logit_softcap:
        logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
    return logits.float()


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_equals_the_naive_model(name: str) -> None:
    config = dataclasses.replace(BASE, **OPTIONS[name])
    model = random_model(config)
    ids = torch.randint(11, (config.block_size,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(ids[None])
    torch.testing.assert_close(logits[0], naive_logits(model, ids.tolist()), rtol=1e-4, atol=1e-4)


def test_a_windowed_model_reads_texts_longer_than_its_block() -> None:
    config = dataclasses.replace(BASE, **OPTIONS["everything"])
    model = random_model(config)
    ids = torch.randint(11, (3 * config.block_size,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits, _ = model(ids[None])
    torch.testing.assert_close(logits[0], naive_logits(model, ids.tolist()), rtol=1e-4, atol=1e-4)
    # reference_logits reads the whole text (no crop): the last row of the banded forward.
    torch.testing.assert_close(reference_logits(model, ids.tolist()), logits[0, -1])
    # Each layer looks W - 1 back (and the bigram embedding one more), so a character
    # further than that before the last has no influence on it, and one inside that reach does.
    reach = config.n_layer * (config.attention_window - 1) + config.bigram_embedding
    for back, matters in ((reach + 1, False), (reach, True)):
        changed = ids.clone()
        changed[-1 - back] = (changed[-1 - back] + 1) % 11
        assert matters != torch.equal(reference_logits(model, changed.tolist()), logits[0, -1])


def test_learned_positions_refuse_more_than_the_block() -> None:
    with pytest.raises(ValueError, match="exceeds block_size"):
        GPT(BASE)(torch.zeros(1, BASE.block_size + 1, dtype=torch.long))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attention_window": 4}, "attention_window needs position rope"),
        ({"position": "rope", "attention_window": 11}, "must not exceed block_size"),
        ({"logit_softcap": -1.0}, "logit_softcap must be a finite number >= 0"),
        ({"logit_softcap": math.inf}, "logit_softcap"),
        ({"activation": "swish"}, "activation must be one of relu, relu2, gelu"),
        ({"norm": "batchnorm"}, "norm must be one of"),
        ({"position": "alibi"}, "position must be one of"),
        ({"position": "rope", "n_embd": 6, "n_head": 2}, "even head size"),
        ({"qk_norm": 1}, "qk_norm must be true or false"),
    ],
)  # fmt: skip
def test_combinations_that_cannot_work_are_refused(options: dict, message: str) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BASE, **options)


def test_the_trainer_takes_every_option_as_the_model_declares_it() -> None:
    """One declaration: each GPTConfig setting is a TrainConfig field with its default,
    help and range (and type), so ``chargpt train --help`` says what the model says."""
    from chargpt.declare import settings_of
    from trainer.config import TrainConfig

    trainer = {field.name: (field, spec) for field, spec in settings_of(TrainConfig)}
    declared = settings_of(GPTConfig)
    assert [field.name for field, _ in declared] == [
        f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"
    ]
    for field, spec in declared:
        taken, taken_spec = trainer[field.name]
        assert (taken.default, taken.type, taken_spec) == (field.default, field.type, spec)


def test_the_model_is_declared_without_click() -> None:
    import subprocess
    import sys

    check = "import sys, chargpt.model; assert 'click' not in sys.modules, 'click imported'"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_round_trips_through_the_checkpoint(name: str, tmp_path: Path) -> None:
    config = dataclasses.replace(BASE, **OPTIONS[name])
    model = random_model(config)
    info = CheckpointInfo(config, tuple("abcdefghijk"), 3, 1.0, 1.1, "00" * 32, name)
    save_checkpoint(tmp_path / "m.safetensors", model, info)
    loaded = load_checkpoint(tmp_path / "m.safetensors")
    assert loaded.info.config == config
    ids = torch.arange(11)[None, : config.block_size]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids)[0], model(ids)[0], rtol=0, atol=0)
    if config.tie_embeddings:  # one tensor, stored once
        assert "lm_head.weight" not in safetensors.torch.load_file(tmp_path / "m.safetensors")


def test_an_unknown_option_is_refused_by_name(tmp_path: Path) -> None:
    model = random_model(BASE)
    meta = CheckpointInfo(BASE, tuple("abcdefghijk"), 3, 1.0, 1.1, "00" * 32, "x").to_metadata()
    meta["config"] = json.dumps({**BASE.to_dict(), "mixture_of_experts": 8})
    path = tmp_path / "future.safetensors"
    safetensors.torch.save_file(dict(model.state_dict()), path, metadata=meta)
    with pytest.raises(CheckpointError, match="unknown model option mixture_of_experts"):
        load_checkpoint(path)


FIXTURES = Path(__file__).parent / "fixtures"


def test_a_checkpoint_written_by_chargpt_0_1_loads_and_gives_the_same_results() -> None:
    """tests/fixtures/v1-lecture-tiny.*: a file written by chargpt 0.1 (format 1) and
    what that version's reference computed on it (greedy text, per-character scores)."""
    from chargpt.model import reference_generate
    from chargpt.sampling import SamplingParams

    expected = json.loads((FIXTURES / "v1-lecture-tiny.json").read_text())
    loaded = load_checkpoint(FIXTURES / "v1-lecture-tiny.safetensors")
    assert loaded.file_sha256 == expected["file_sha256"] and loaded.info.step == expected["step"]
    tok = loaded.tokenizer
    greedy = reference_generate(
        loaded.model, tok.encode(expected["prompt"]), 200, SamplingParams(temperature=0)
    )
    assert tok.decode(greedy) == expected["greedy_200"]
    ids = [0, *tok.encode(expected["score_text"])]
    got = [
        float(torch.log_softmax(reference_logits(loaded.model, ids[:i]), dim=-1)[ids[i]])
        for i in range(1, len(ids))
    ]
    assert got == pytest.approx(expected["score_logprobs"], abs=1e-5)
