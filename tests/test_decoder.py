"""The serving forward passes equal the model's reference (``reference_logits``: the crop
to the block, or one banded forward over the whole text), for both kinds of model."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

import pytest
import torch

from chargpt.model import GPT, GPTConfig, reference_logits
from server.decoder import Decoder
from server.requests import ScoreJob, ScoreParams
from server.served import decodes_from_cache
from tests.conftest import sharp_model

LEARNED = GPTConfig(vocab_size=13, block_size=8, n_embd=16, n_head=2, n_layer=3)
WINDOWED = GPTConfig(
    vocab_size=13, block_size=12, n_embd=16, n_head=2, n_layer=3, position="rope",
    attention_window=5, norm="rmsnorm", activation="relu2", qk_norm=True, bias=False,
    tie_embeddings=True, logit_softcap=15.0,
)  # fmt: skip
# Each with and without the bigram embedding, which reads the character before each new one.
CONFIGS = pytest.mark.parametrize(
    "config",
    [
        LEARNED,
        WINDOWED,
        *(dataclasses.replace(c, bigram_embedding=True) for c in (LEARNED, WINDOWED)),
    ],
    ids=["learned", "windowed", "learned-bigram", "windowed-bigram"],
)
_ids = itertools.count()


@dataclass
class Seq:
    tokens: list[int]
    id: int = field(default_factory=lambda: next(_ids))
    computed: int = 0  # advanced here as the engine does, after each forward pass


def prefill(decoder: Decoder, chunks: list[tuple[Seq, int]]) -> list[torch.Tensor | None]:
    chunks = [(s, min(n, len(s.tokens) - s.computed)) for s, n in chunks]
    out = decoder.prefill(chunks)
    for seq, count in chunks:
        seq.computed += count
    return out


def decode(decoder: Decoder, seqs: list[Seq]) -> torch.Tensor:
    """Each sequence as the engine's schedule plans it: from its cache while the rule says
    so (its slot released once it does not), else a recomputed window."""
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for seq in seqs:
        if seq.id in decoder.slot_of and not decodes_from_cache(decoder.config, len(seq.tokens)):
            decoder.release(seq.id)
    cached = [i for i, s in enumerate(seqs) if s.id in decoder.slot_of]
    windows = [i for i, s in enumerate(seqs) if s.id not in decoder.slot_of]
    if cached:
        for i, row in zip(cached, decoder.decode([seqs[i] for i in cached]), strict=True):
            out[i] = row
            seqs[i].computed = len(seqs[i].tokens)
    if windows:
        for i, row in zip(windows, decoder.recompute([seqs[i] for i in windows]), strict=True):
            out[i] = row
    return torch.stack(out)  # type: ignore[arg-type]


def close(got: torch.Tensor, m: GPT, tokens: list[int]) -> None:
    torch.testing.assert_close(got, reference_logits(m, tokens), rtol=1e-5, atol=1e-5)


@CONFIGS
def test_prefill_then_decode_equals_the_reference_far_past_the_window(config: GPTConfig) -> None:
    m = sharp_model(config)
    decoder = Decoder(m, slots=4)
    seqs = [Seq([1]), Seq([2, 3, 4]), Seq([5, 6, 7, 8, 9, 10, 11, 12, 0, 1]), Seq([3, 3])]
    generator = torch.Generator().manual_seed(0)
    for seq in seqs:  # as the engine does: prompt chunks (of two here), then decode
        if decodes_from_cache(config, len(seq.tokens)):
            decoder.start(seq)
        logits = None
        while logits is None:
            pending = seq.id in decoder.slot_of and len(seq.tokens) - seq.computed > 1
            logits = prefill(decoder, [(seq, 2)])[0] if pending else decode(decoder, [seq])[0]
        close(logits, m, seq.tokens)
    for step in range(4 * config.block_size):
        for seq in seqs:
            seq.tokens.append(int(torch.randint(13, (1,), generator=generator)))
        ready = [s for s in seqs if s.id not in decoder.slot_of or s.computed == len(s.tokens) - 1]
        assert len(ready) == len(seqs)
        got = decode(decoder, ready)
        for row, seq in enumerate(ready):
            close(got[row], m, seq.tokens)
        if step == 5:  # a sequence leaves: the others' cache entries move, results do not
            decoder.release(seqs[1].id)
            seqs.pop(1)


@CONFIGS
def test_prompts_prefilled_together_equal_the_reference(config: GPTConfig) -> None:
    """Chunks of equal length from different slots and starts share one forward."""
    m = sharp_model(config)
    decoder = Decoder(m, slots=4)
    # Third slot first: the forward's rows are not in slot order.
    seqs = [Seq([4, 1, 2, 3, 4, 5, 6]), Seq([7, 8]), Seq([9, 10, 11, 12, 0]), Seq([1] * 7)]
    for seq in seqs:
        decoder.start(seq)
    done: dict[int, torch.Tensor] = {}
    while len(done) < len(seqs):
        chunks = [(s, 3 if s.id % 2 else 2) for s in seqs if s.id not in done]
        for (seq, _), logits in zip(chunks, prefill(decoder, chunks), strict=True):
            if logits is not None:
                done[seq.id] = logits
    for seq in seqs:
        close(done[seq.id], m, seq.tokens)
    for seq in seqs:  # and the caches they left are right
        seq.tokens.append(3)
    got = decode(decoder, seqs)
    for row, seq in enumerate(seqs):
        close(got[row], m, seq.tokens)


def test_learned_rows_leave_the_cache_once_the_text_outgrows_the_block() -> None:
    m = sharp_model(LEARNED)
    decoder = Decoder(m, slots=2)
    seq = Seq([1, 2])
    assert decodes_from_cache(LEARNED, len(seq.tokens))
    decoder.start(seq)
    prefill(decoder, [(seq, 100)])
    while len(seq.tokens) <= LEARNED.block_size:
        seq.tokens.append(3)
        close(decode(decoder, [seq])[0], m, seq.tokens)
    assert not decodes_from_cache(LEARNED, len(seq.tokens)) and seq.id not in decoder.slot_of
    close(decoder.recompute([seq])[0], m, seq.tokens)
    long = Seq(list(range(12)))  # longer than the block from the start: no slot at all
    assert not decodes_from_cache(LEARNED, len(long.tokens))
    assert decodes_from_cache(WINDOWED, 10**6)  # a windowed model's slot is its window


def test_slots_stay_compact() -> None:
    decoder = Decoder(sharp_model(WINDOWED), slots=3)
    seqs = [Seq([i]) for i in range(3)]
    for seq in seqs:
        decoder.start(seq)
    assert sorted(decoder.slot_of.values()) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="no free cache slot"):
        decoder.start(Seq([4]))
    decoder.release(seqs[0].id)
    assert sorted(decoder.slot_of.values()) == [0, 1]


@CONFIGS
@pytest.mark.parametrize("budget", [1, 7, 1000])
def test_score_equals_the_reference_per_position(config: GPTConfig, budget: int) -> None:
    m = sharp_model(config)
    decoder = Decoder(m, slots=1)
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(13, (50,), generator=generator).tolist()
    for first_target in (1, 9, 30):
        job = ScoreJob(ScoreParams(ids, first_target, first_target - 1), None, 0.0)  # type: ignore[arg-type]
        while not job.done:
            job.logprobs.extend(decoder.score(job, budget)[0])
        decoder.finish_score(job.id)
        expected = [
            float(torch.log_softmax(reference_logits(m, ids[:i]), dim=-1)[ids[i]])
            for i in range(first_target, len(ids))
        ]
        assert job.logprobs == pytest.approx(expected, abs=1e-5)
