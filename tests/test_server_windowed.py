"""A windowed rotary model served by the real ``chargpt serve``: every character decoded
from its KV cache, and the same text as the banded full-forward reference."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chargpt.checkpoint import LoadedModel, load_checkpoint
from chargpt.model import reference_generate, reference_logits
from chargpt.sampling import SamplingParams
from tests.conftest import run_chargpt
from tests.server_process import ServerProcess, crowd


@pytest.fixture(scope="module")
def server(windowed_checkpoint: Path) -> Iterator[ServerProcess]:
    with ServerProcess(windowed_checkpoint, "--max-new-tokens", "100000") as running:
        yield running


@pytest.fixture(scope="module")
def reference(windowed_checkpoint: Path) -> LoadedModel:
    return load_checkpoint(windowed_checkpoint)


def reference_text(reference: LoadedModel, prompt: str, n: int, params: SamplingParams,
                   seed: int = 0) -> str:  # fmt: skip
    ids = reference.tokenizer.encode(prompt) if prompt else [0]
    return reference.tokenizer.decode(reference_generate(reference.model, ids, n, params, seed))


def test_model_info_describes_the_window(server: ServerProcess) -> None:
    info = server.client.model_info()
    assert info.options.position == "rope" and info.options.attention_window == 12
    assert info.options.norm == "rmsnorm" and info.options.activation == "relu2"
    assert info.options.qk_norm and not info.options.bias and info.context_characters == 12
    assert "sliding window 12" in info.architecture


def test_greedy_two_thousand_characters_equal_the_reference(
    server: ServerProcess, reference: LoadedModel
) -> None:
    text, summary = server.client.generate_text("ROMEO:", max_new_tokens=2000, temperature=0)
    assert summary.usage.generated_characters == 2000
    assert text == reference_text(reference, "ROMEO:", 2000, SamplingParams(temperature=0))
    # Every character after the prompt came from the cache: one position per step.
    assert server.metric("chargpt_computed_positions_total", work="decode") >= 1999
    assert server.metric("chargpt_computed_positions_total", work="window") == 0


def test_seeded_sampling_equals_the_reference_and_the_offline_sampler(
    server: ServerProcess, reference: LoadedModel, windowed_checkpoint: Path
) -> None:
    params = SamplingParams(0.9, 20, 0.95)
    text, _ = server.client.generate_text(
        "JULIET:", max_new_tokens=300, seed=42, temperature=0.9, top_k=20, top_p=0.95
    )
    assert text == reference_text(reference, "JULIET:", 300, params, seed=42)
    offline = run_chargpt(
        "sample", "--checkpoint", str(windowed_checkpoint), "--prompt", "JULIET:",
        "--max-new-tokens", "300", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95",
        "--seed", "42",
    )  # fmt: skip
    assert offline.returncode == 0, offline.stderr
    assert offline.stdout == text


def test_a_prompt_longer_than_the_window(server: ServerProcess, reference: LoadedModel) -> None:
    prompt = "ROMEO:\nThe quick brown fox jumps over a lazy dog and then sleeps.\n" * 20
    text, _ = server.client.generate_text(prompt, max_new_tokens=100, temperature=0)
    assert text == reference_text(reference, prompt, 100, SamplingParams(temperature=0))


def test_score_of_a_thousand_characters_equals_the_reference(
    server: ServerProcess, reference: LoadedModel
) -> None:
    text = ("NURSE:\nThen romeo sings to juliet under her balcony at night.\n\n" * 20)[:1000]
    for context in ("", "JULIET:\nThe lazy dog and the fox.\n"):
        result = server.client.score(text, context=context)
        ids = reference.tokenizer.encode(context) if context else [0]
        first = len(ids)
        ids += reference.tokenizer.encode(text)
        expected = [
            float(torch.log_softmax(reference_logits(reference.model, ids[:i]), dim=-1)[ids[i]])
            for i in range(first, len(ids))
        ]
        assert result.scored_characters == 1000
        assert list(result.logprobs) == pytest.approx(expected, abs=1e-4)


def test_same_seed_same_text_alone_or_among_fifty(server: ServerProcess) -> None:
    request = {"max_new_tokens": 200, "temperature": 1.0, "top_k": 20, "seed": 1234}
    alone, _ = server.client.generate_text("ROMEO:", **request)
    steps_before = server.metric("chargpt_batch_size_count")
    small_before = server.metric("chargpt_batch_size_bucket", le="8.0")
    with crowd(server, 50):  # every step of the crowded request decodes 51 rows
        crowded, _ = server.client.generate_text("ROMEO:", **request)
        assert crowded == alone
    assert (
        server.metric("chargpt_batch_size_count") - steps_before
        > server.metric("chargpt_batch_size_bucket", le="8.0") - small_before
    )  # the steps really did batch more than 8 generations
