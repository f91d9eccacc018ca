"""The serving forward passes equal the model's plain forward (and so the reference)."""

import torch

from chargpt.model import GPT, GPTConfig
from server.decoder import Decoder

CONFIG = GPTConfig(vocab_size=13, block_size=8, n_embd=16, n_head=2, n_layer=3)


def model() -> GPT:
    torch.manual_seed(0)
    m = GPT(CONFIG).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def last_logits(m: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return m(torch.tensor([ids[-CONFIG.block_size :]]))[0][0, -1]


def test_ragged_windows_equal_separate_full_forwards() -> None:
    m = model()
    decoder = Decoder(m, cache_slots=4)
    windows = [[1, 2, 3, 4, 5, 6, 7, 8], [3], [4, 4, 1], [12, 0, 5, 5, 5]]
    got = decoder.forward_windows(windows)
    for row, window in enumerate(windows):
        torch.testing.assert_close(got[row], last_logits(m, window), rtol=1e-5, atol=1e-5)


def test_cached_decode_equals_full_forward_until_the_window_is_full() -> None:
    m = model()
    decoder = Decoder(m, cache_slots=3)
    contexts = [[1], [2, 3, 4], [5, 6]]
    slots = [decoder.cache.allocate() for _ in contexts]
    decoder.forward_windows(contexts, slots)  # fills the cache
    generator = torch.Generator().manual_seed(0)
    while max(len(c) for c in contexts) < CONFIG.block_size:
        new = torch.randint(13, (3,), generator=generator).tolist()
        positions = [len(c) for c in contexts]
        contexts = [[*c, t] for c, t in zip(contexts, new, strict=True)]
        got = decoder.forward_cached(new, positions, slots)  # type: ignore[arg-type]
        for row, context in enumerate(contexts):
            torch.testing.assert_close(got[row], last_logits(m, context), rtol=1e-5, atol=1e-5)


def test_cache_slots_are_reused() -> None:
    decoder = Decoder(model(), cache_slots=2)
    a, b = decoder.cache.allocate(), decoder.cache.allocate()
    assert {a, b} == {0, 1} and decoder.cache.allocate() is None
    decoder.cache.release(a)  # type: ignore[arg-type]
    assert decoder.cache.allocate() == a
