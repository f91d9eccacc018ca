import math

import pytest
import torch

from chargpt.sampling import SamplingParams, filtered_log_probs, sample_token

LOGITS = torch.tensor([1.0, 3.0, 2.0, 0.0, -1.0])


def test_greedy_is_argmax() -> None:
    assert sample_token(LOGITS, SamplingParams(temperature=0)) == 1


def test_no_filter_is_log_softmax_of_scaled_logits() -> None:
    got = filtered_log_probs(LOGITS, SamplingParams(temperature=2.0))
    torch.testing.assert_close(got, torch.log_softmax(LOGITS / 2, dim=-1))


def test_top_k_keeps_the_k_most_likely() -> None:
    got = filtered_log_probs(LOGITS, SamplingParams(top_k=2))
    assert torch.isfinite(got).tolist() == [False, True, True, False, False]
    assert math.isclose(got.exp().sum().item(), 1.0, rel_tol=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.softmax(LOGITS, dim=-1)  # about .09 .67 .24 .03 .01
    got = filtered_log_probs(LOGITS, SamplingParams(top_p=0.7))
    assert torch.isfinite(got).tolist() == [False, True, True, False, False]
    got = filtered_log_probs(LOGITS, SamplingParams(top_p=float(probs[1]) - 0.01))
    assert torch.isfinite(got).tolist() == [False, True, False, False, False]


def test_samples_only_from_the_allowed_set_and_reproducibly() -> None:
    params = SamplingParams(temperature=1.0, top_k=2)
    draws = [sample_token(LOGITS, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert set(draws) == {1, 2}
    again = [sample_token(LOGITS, params, torch.Generator().manual_seed(s)) for s in range(200)]
    assert draws == again


@pytest.mark.parametrize(
    "kwargs", [{"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5}]
)
def test_invalid_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
