"""The compiled decode step (``server/compiled.py``) computes what the eager one does: the
same logits as the reference at every position, padding rows that never reach a real row,
the same greedy and seeded text through the engine alone and in a batch, and eager
serving, with a log line, where it cannot compile."""

from __future__ import annotations

import logging
import queue

import pytest
import torch

from chargpt.checkpoint import CheckpointInfo, LoadedModel
from chargpt.model import GPT, GPTConfig, reference_generate, reference_logits
from chargpt.sampling import SamplingParams
from chargpt.tokenizer import CharTokenizer
from server.compiled import batch_sizes
from server.decoder import Decoder
from server.engine import Engine
from server.metrics import ServerMetrics
from server.requests import Chunk, GenerateParams
from server.served import ServedModel, decodes_from_cache
from tests.conftest import sharp_model

VOCAB = tuple("abcdefghijklm")
LEARNED = GPTConfig(vocab_size=13, block_size=8, n_embd=16, n_head=2, n_layer=2)
WINDOWED = GPTConfig(
    vocab_size=13, block_size=12, n_embd=16, n_head=2, n_layer=2, position="rope",
    attention_window=5, norm="rmsnorm", activation="relu2", qk_norm=True, bigram_embedding=True,
)  # fmt: skip
CONFIGS = pytest.mark.parametrize("config", [LEARNED, WINDOWED], ids=["learned", "windowed"])
SLOTS = 4  # buckets 1 and 4: a batch of 2 or 3 runs padded


@pytest.fixture(scope="module")
def compiled() -> dict[str, tuple[GPT, Decoder]]:
    """One compiled decoder per kind of model (compiling takes seconds per graph)."""
    out = {}
    for name, config in (("learned", LEARNED), ("windowed", WINDOWED)):
        m = sharp_model(config)
        decoder = Decoder(m, SLOTS, compile=True)
        assert decoder.compiled is not None, "this machine has a C++ compiler"
        out[name] = (m, decoder)
    return out


def test_buckets_grow_by_four_up_to_the_cap() -> None:
    assert batch_sizes(1) == [1]
    assert batch_sizes(4) == [1, 4]
    assert batch_sizes(64) == [1, 4, 16, 64]
    assert batch_sizes(20) == [1, 4, 16, 20]


@CONFIGS
def test_compiled_decoding_equals_the_reference_with_padding_rows(
    config: GPTConfig, compiled: dict[str, tuple[GPT, Decoder]]
) -> None:
    """Three rows (padded into the bucket of four), then two and one as rows leave, past
    the window or the block: every row's logits are the reference's."""
    m, decoder = compiled["learned" if config is LEARNED else "windowed"]
    generator = torch.Generator().manual_seed(0)
    texts = [[1], [2, 3, 4], [5, 6]]
    ids = list(range(len(texts)))
    computed = {i: 0 for i in ids}
    for i in ids:
        decoder.start(_Row(i, texts[i], 0))
    for step in range(3 * config.block_size):
        live = [i for i in ids if i in computed]
        # As the engine schedules: prompts in the cache first, then one position each.
        for i in live:
            if i in decoder.slot_of and len(texts[i]) - computed[i] > 1:
                decoder.prefill([(_Row(i, texts[i], computed[i]), len(texts[i]) - 1 - computed[i])])
                computed[i] = len(texts[i]) - 1
            if i in decoder.slot_of and not decodes_from_cache(config, len(texts[i])):
                decoder.release(i)
        cached = [i for i in live if i in decoder.slot_of]
        windows = [i for i in live if i not in decoder.slot_of]
        if cached:
            got = decoder.decode([_Row(i, texts[i], computed[i]) for i in cached])
            for row, i in zip(got, cached, strict=True):
                _close(row, m, texts[i])
                computed[i] = len(texts[i])
        if windows:
            got = decoder.recompute([_Row(i, texts[i], computed[i]) for i in windows])
            for row, i in zip(got, windows, strict=True):
                _close(row, m, texts[i])
        for i in live:
            texts[i].append(int(torch.randint(13, (1,), generator=generator)))
        if step in (4, 2 * config.block_size):  # a row leaves: fewer rows, more padding
            leaving = live[0]
            decoder.release(leaving)
            del computed[leaving]
    for i in list(computed):
        decoder.release(i)


@CONFIGS
def test_greedy_text_equals_eager_and_seeded_text_is_the_same_alone_and_in_a_batch(
    config: GPTConfig, compiled: dict[str, tuple[GPT, Decoder]]
) -> None:
    m, decoder = compiled["learned" if config is LEARNED else "windowed"]
    greedy = SamplingParams(temperature=0)
    prompt = [1, 2, 3]
    (text,) = generate(m, decoder, [(prompt, greedy, 0)], 500)
    assert text == generate(m, Decoder(m, SLOTS), [(prompt, greedy, 0)], 500)[0]
    assert text == reference_generate(m, prompt, 500, greedy)
    sampled = SamplingParams(temperature=1.0, top_k=8)
    alone = generate(m, decoder, [(prompt, sampled, 7)], 100)
    batch = generate(
        m, decoder, [([4], sampled, 1), (prompt, sampled, 7), ([5, 6], greedy, 2)], 100
    )
    assert batch[1] == alone[0] == reference_generate(m, prompt, 100, sampled, seed=7)


def test_without_a_compiler_the_decoder_serves_eager_and_says_why(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", "no-such-compiler")
    m = sharp_model(WINDOWED)
    with caplog.at_level(logging.WARNING, logger="server.compiled"):
        decoder = Decoder(m, SLOTS, compile=True)
    assert decoder.compiled is None
    assert "serving eager: the decode step could not be compiled: no C++ compiler" in caplog.text
    prompt = [1, 2]
    greedy = SamplingParams(temperature=0)
    assert generate(m, decoder, [(prompt, greedy, 0)], 20)[0] == reference_generate(
        m, prompt, 20, greedy
    )


# ---- helpers ----------------------------------------------------------------------------


class _Row:
    def __init__(self, id: int, tokens: list[int], computed: int) -> None:
        self.id, self.tokens, self.computed = id, tokens, computed


def _close(got: torch.Tensor, m: GPT, tokens: list[int]) -> None:
    torch.testing.assert_close(got, reference_logits(m, tokens), rtol=1e-5, atol=1e-5)


def generate(
    m: GPT, decoder: Decoder, requests: list[tuple[list[int], SamplingParams, int]], n: int
) -> list[list[int]]:
    """The ids each request generates, all submitted together to one engine."""
    info = CheckpointInfo(m.config, VOCAB, 1, None, None, "", "test")
    loaded = LoadedModel(m, CharTokenizer(VOCAB), info, "sha")
    served = ServedModel(loaded, "model.safetensors", torch.device("cpu"), torch.float32, 0.0,
                         decoder)  # fmt: skip
    engine = Engine(ServerMetrics(), SLOTS, SLOTS)
    queues = []
    for prompt, sampling, seed in requests:
        q: queue.SimpleQueue[object] = queue.SimpleQueue()
        engine.submit_generation(GenerateParams(prompt, n, sampling, seed), served, q)
        queues.append(q)
    while engine.load() != (0, 0):
        engine.step()
    texts = []
    for q in queues:
        chunks = []
        while not q.empty():
            event = q.get_nowait()
            if isinstance(event, Chunk):
                chunks.append(event.text)
        texts.append([VOCAB.index(c) for c in "".join(chunks)])
    return texts
