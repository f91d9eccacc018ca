"""Sampling: the filters against their definitions, the counter-based draw against a plain
Python SplitMix64, and per-row independence from the rest of the batch."""

import math

import pytest
import torch

from chargpt.sampling import SamplingParams, sample, sample_next, uniforms

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])


def log_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    return sample(logits[None], [params], [0], [0]).log_probs[0]


def test_greedy_is_argmax_and_reports_the_models_distribution() -> None:
    result = sample(LOGITS[None], [SamplingParams(temperature=0)], [5], [3])
    assert result.tokens.tolist() == [1]
    torch.testing.assert_close(result.log_probs[0], torch.log_softmax(LOGITS, dim=-1))


def test_no_filter_is_log_softmax_of_scaled_logits() -> None:
    got = log_probs(LOGITS, SamplingParams(temperature=2.0))
    torch.testing.assert_close(got, torch.log_softmax(LOGITS / 2, dim=-1))


def test_top_k_keeps_the_k_most_likely() -> None:
    got = log_probs(LOGITS, SamplingParams(top_k=2))
    assert torch.isfinite(got).tolist() == [False, True, True, False, False]
    assert math.isclose(got.exp().sum().item(), 1.0, rel_tol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.softmax(LOGITS, dim=-1)  # about .09 .67 .24 .03 .01
    got = log_probs(LOGITS, SamplingParams(top_p=0.7))
    assert torch.isfinite(got).tolist() == [False, True, True, False, False]
    got = log_probs(LOGITS, SamplingParams(top_p=float(probs[1]) - 0.01))
    assert torch.isfinite(got).tolist() == [False, True, False, False, False]
    # top_p applies to what top_k kept: of {1, 2} renormalised (.73, .27), 0.7 keeps one.
    got = log_probs(LOGITS, SamplingParams(top_k=2, top_p=0.7))
    assert torch.isfinite(got).tolist() == [False, True, False, False, False]


@pytest.mark.parametrize("temperature", [1e-38, 1e-45, 5e-324, 1e-30])
def test_tiny_temperatures_are_greedy_in_the_limit_never_nan(temperature: float) -> None:
    logits = torch.randn(4, 65, generator=torch.Generator().manual_seed(0)) * 5
    result = sample(logits, [SamplingParams(temperature)] * 4, [1, 2, 3, 4], [0, 1, 2, 3])
    assert not result.failed.any()
    assert torch.equal(result.tokens, logits.argmax(dim=-1))
    assert not torch.isnan(result.log_probs).any()


def splitmix64_reference(seed: int, index: int) -> float:
    """Element ``index`` of the SplitMix64 stream starting at mix(seed), in plain Python."""
    mask = (1 << 64) - 1

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    state = mix(seed)
    return (mix((state + (index + 1) * 0x9E3779B97F4A7C15) & mask) >> 11) * 2.0**-53


def test_uniforms_are_splitmix64() -> None:
    seeds = [0, 1, 42, 2**63 - 1, 2**63, 2**64 - 1, 123456789]
    indices = [0, 7, 100, 5, 2**40, 0, 99999]
    got = uniforms(seeds, indices).tolist()
    assert got == [splitmix64_reference(s, i) for s, i in zip(seeds, indices, strict=True)]
    assert all(0 <= u < 1 for u in got)


def test_draws_follow_the_distribution() -> None:
    params = SamplingParams(temperature=1.0)
    n = 20_000
    tokens = sample(LOGITS.expand(n, -1), [params] * n, [7] * n, list(range(n))).tokens
    freq = torch.bincount(tokens, minlength=5).double() / n
    expected = torch.softmax(LOGITS.double(), dim=-1)
    # 20,000 deterministic draws: each frequency within 4 standard errors.
    assert torch.all((freq - expected).abs() <= 4 * (expected * (1 - expected) / n).sqrt() + 1e-9)


def test_only_allowed_tokens_and_reproducible() -> None:
    params = SamplingParams(temperature=1.0, top_k=2)
    draws = [sample_next(LOGITS, params, seed, 0) for seed in range(200)]
    assert set(draws) == {1, 2}
    assert draws == [sample_next(LOGITS, params, seed, 0) for seed in range(200)]


def test_a_row_does_not_depend_on_its_batch() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 65, generator=generator) * 3
    params = [
        SamplingParams(temperature=[0.0, 0.7, 1.0, 1.3][i % 4], top_k=[0, 5, 40][i % 3],
                       top_p=[1.0, 0.9, 0.5][i % 3])
        for i in range(64)
    ]  # fmt: skip
    seeds, indices = list(range(1000, 1064)), [i * 3 for i in range(64)]
    together = sample(logits, params, seeds, indices)
    for i in range(64):
        alone = sample(logits[i : i + 1], params[i : i + 1], seeds[i : i + 1], indices[i : i + 1])
        assert alone.tokens.item() == together.tokens[i].item()
        assert torch.equal(alone.log_probs[0], together.log_probs[i])


def test_non_finite_rows_fail_alone() -> None:
    logits = torch.stack([LOGITS, torch.full((5,), float("nan")), LOGITS])
    logits[2, 0] = float("inf")
    params = [SamplingParams(temperature=0.8)] * 3
    result = sample(logits, params, [1, 2, 3], [0, 0, 0])
    assert result.failed.tolist() == [False, True, True]
    assert result.tokens[0] == sample_next(LOGITS, params[0], 1, 0)


@pytest.mark.parametrize(
    "kwargs",
    [{"temperature": -0.1}, {"temperature": math.inf}, {"temperature": math.nan},
     {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}],
)  # fmt: skip
def test_invalid_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
