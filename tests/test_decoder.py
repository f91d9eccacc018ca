"""The serving forward passes equal the model's reference (``reference_logits``: the crop
to the block, or one banded forward over the whole text), for both kinds of model."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import pytest
import torch

from chargpt.model import GPT, GPTConfig, reference_logits
from server.decoder import Decoder
from server.requests import ScoreJob, ScoreParams

LEARNED = GPTConfig(vocab_size=13, block_size=8, n_embd=16, n_head=2, n_layer=3)
WINDOWED = GPTConfig(
    vocab_size=13, block_size=12, n_embd=16, n_head=2, n_layer=3, position="rope",
    attention_window=5, norm="rmsnorm", activation="relu2", qk_norm=True, bias=False,
    tie_embeddings=True, logit_softcap=15.0,
)  # fmt: skip
_ids = itertools.count()


@dataclass
class Seq:
    tokens: list[int]
    id: int = field(default_factory=lambda: next(_ids))


def model(config: GPTConfig) -> GPT:
    torch.manual_seed(0)
    m = GPT(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.5)
    return m


def close(got: torch.Tensor, m: GPT, tokens: list[int]) -> None:
    torch.testing.assert_close(got, reference_logits(m, tokens), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config", [LEARNED, WINDOWED], ids=["learned", "windowed"])
def test_prefill_then_decode_equals_the_reference_far_past_the_window(config: GPTConfig) -> None:
    m = model(config)
    decoder = Decoder(m, slots=4)
    seqs = [Seq([1]), Seq([2, 3, 4]), Seq([5, 6, 7, 8, 9, 10, 11, 12, 0, 1]), Seq([3, 3])]
    generator = torch.Generator().manual_seed(0)
    for seq in seqs:  # as the engine does: prompt chunks (of two here), then decode
        decoder.start(seq)
        logits = None
        while logits is None:
            pending = decoder.pending(seq)
            logits = decoder.prefill([(seq, 2)])[0] if pending else decoder.decode([seq])[0]
        close(logits, m, seq.tokens)
    for step in range(4 * config.block_size):
        for seq in seqs:
            seq.tokens.append(int(torch.randint(13, (1,), generator=generator)))
        ready = [s for s in seqs if decoder.pending(s) == 0]
        assert len(ready) == len(seqs)
        got = decoder.decode(ready)
        for row, seq in enumerate(ready):
            close(got[row], m, seq.tokens)
        if step == 5:  # a sequence leaves: the others' cache entries move, results do not
            decoder.release(seqs[1].id)
            seqs.pop(1)


@pytest.mark.parametrize("config", [LEARNED, WINDOWED], ids=["learned", "windowed"])
def test_prompts_prefilled_together_equal_the_reference(config: GPTConfig) -> None:
    """Chunks of equal length from different slots and starts share one forward."""
    m = model(config)
    decoder = Decoder(m, slots=4)
    # Third slot first: the forward's rows are not in slot order.
    seqs = [Seq([4, 1, 2, 3, 4, 5, 6]), Seq([7, 8]), Seq([9, 10, 11, 12, 0]), Seq([1] * 7)]
    for seq in seqs:
        decoder.start(seq)
    done: dict[int, torch.Tensor] = {}
    while len(done) < len(seqs):
        chunks = [(s, 3 if s.id % 2 else 2) for s in seqs if s.id not in done]
        for (seq, _), logits in zip(chunks, decoder.prefill(chunks), strict=True):
            if logits is not None:
                done[seq.id] = logits
    for seq in seqs:
        close(done[seq.id], m, seq.tokens)
    for seq in seqs:  # and the caches they left are right
        seq.tokens.append(3)
    got = decoder.decode(seqs)
    for row, seq in enumerate(seqs):
        close(got[row], m, seq.tokens)


def test_learned_rows_leave_the_cache_once_the_text_outgrows_the_block() -> None:
    decoder = Decoder(model(LEARNED), slots=2)
    seq = Seq([1, 2])
    decoder.start(seq)
    decoder.prefill([(seq, 100)])
    assert decoder.cost(seq) == 1
    while len(seq.tokens) <= LEARNED.block_size:
        seq.tokens.append(3)
        decoder.decode([seq])
    assert decoder.cost(seq) == LEARNED.block_size and seq.id not in decoder.slot_of
    long = Seq(list(range(12)))  # longer than the block from the start: no slot at all
    decoder.start(long)
    assert decoder.pending(long) == 0 and decoder.cost(long) == LEARNED.block_size


def test_slots_stay_compact() -> None:
    decoder = Decoder(model(WINDOWED), slots=3)
    seqs = [Seq([i]) for i in range(3)]
    for seq in seqs:
        decoder.start(seq)
    assert sorted(decoder.slot_of.values()) == [0, 1, 2]
    with pytest.raises(RuntimeError, match="no free cache slot"):
        decoder.start(Seq([4]))
    decoder.release(seqs[0].id)
    assert sorted(decoder.slot_of.values()) == [0, 1]


@pytest.mark.parametrize("config", [LEARNED, WINDOWED], ids=["learned", "windowed"])
@pytest.mark.parametrize("budget", [1, 7, 1000])
def test_score_equals_the_reference_per_position(config: GPTConfig, budget: int) -> None:
    m = model(config)
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
