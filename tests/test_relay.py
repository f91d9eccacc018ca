"""How the service turns engine events into stream messages."""

import asyncio
from types import SimpleNamespace

from chargpt.v1 import language_model_pb2 as pb
from server.config import Limits
from server.metrics import ServerMetrics
from server.requests import Chunk, Finished, FinishReason, TokenDetail
from server.service import LanguageModelService

VOCAB = ("\n", "a", "b", "c")


def finished() -> Finished:
    model = SimpleNamespace(loaded=SimpleNamespace(info=SimpleNamespace(step=7), file_sha256="ab"))
    return Finished(FinishReason.LENGTH, "", 1, 3, 5, 0.0, 0.001, 0.01, model)  # type: ignore[arg-type]


def chunk(text: str) -> Chunk:
    return Chunk(text, [TokenDetail(VOCAB.index(c), -0.5, []) for c in text])


def test_one_message_per_character_and_the_backlog_in_one() -> None:
    async def scenario() -> list[pb.GenerateResponse]:
        service = LanguageModelService(None, ServerMetrics(), Limits())  # type: ignore[arg-type]
        events: asyncio.Queue = asyncio.Queue()
        relay = service._relay(events, VOCAB, per_message=1)
        out = []
        events.put_nowait(chunk("a"))
        out.append(await anext(relay))  # the reader keeps up: one character
        events.put_nowait(chunk("b"))
        out.append(await anext(relay))
        for c in "cab":  # three arrive before the reader comes back: one message
            events.put_nowait(chunk(c))
        out.append(await anext(relay))
        events.put_nowait(finished())
        out.append(await anext(relay))
        return out

    messages = asyncio.run(scenario())
    assert [m.text for m in messages] == ["a", "b", "cab", ""]
    assert [t.token.text for t in messages[2].tokens] == ["c", "a", "b"]
    assert messages[-1].summary.finish_reason == pb.FINISH_REASON_LENGTH
    assert messages[-1].summary.model.step == 7


def test_characters_per_message_waits_for_enough() -> None:
    async def scenario() -> list[str]:
        service = LanguageModelService(None, ServerMetrics(), Limits())  # type: ignore[arg-type]
        events: asyncio.Queue = asyncio.Queue()
        for c in "abcab":
            events.put_nowait(chunk(c))
        events.put_nowait(finished())
        return [m.text async for m in service._relay(events, VOCAB, per_message=2)]

    texts = asyncio.run(scenario())
    assert "".join(texts) == "abcab" and texts[-1] == ""
    assert all(len(t) >= 2 for t in texts[:-1])


def relay_all(events: list, per_message: int, at_most: int) -> list[pb.GenerateResponse]:  # type: ignore[type-arg]
    """What the relay sends for ``events``, all already waiting (a reader that fell
    behind), taking one message at a time."""

    async def scenario() -> list[pb.GenerateResponse]:
        service = LanguageModelService(None, ServerMetrics(), Limits())  # type: ignore[arg-type]
        queue: asyncio.Queue = asyncio.Queue()
        for event in events:
            queue.put_nowait(event)
        return [m async for m in service._relay(queue, VOCAB, per_message, at_most)]

    return asyncio.run(scenario())


def test_a_backlog_is_split_at_the_ceiling_in_order() -> None:
    text = "abcabcabcab"  # 11 characters waiting, in chunks of 1 and 3 (stop releases)
    events = [chunk("a"), chunk("bca"), chunk("b"), chunk("cab"), chunk("cab"), finished()]
    messages = relay_all(events, per_message=1, at_most=4)
    assert "".join(m.text for m in messages) == text
    assert [len(m.text) for m in messages] == [4, 4, 3, 0]
    assert messages[-1].HasField("summary")
    # Each message's per-character entries are its own characters, in order.
    for m in messages:
        assert "".join(t.token.text for t in m.tokens) == m.text


def test_a_ceiling_and_a_floor_together() -> None:
    events = [chunk(c) for c in "abcabca"] + [finished()]
    messages = relay_all(events, per_message=2, at_most=3)
    assert "".join(m.text for m in messages) == "abcabca"
    assert all(2 <= len(m.text) <= 3 for m in messages[:-1]) and len(messages[-1].text) <= 3


def test_a_reader_that_keeps_up_gets_each_character_at_once_with_a_ceiling() -> None:
    async def scenario() -> list[str]:
        service = LanguageModelService(None, ServerMetrics(), Limits())  # type: ignore[arg-type]
        events: asyncio.Queue = asyncio.Queue()
        relay = service._relay(events, VOCAB, per_message=1, at_most=2)
        out = []
        for c in "abc":
            events.put_nowait(chunk(c))
            out.append((await anext(relay)).text)  # no waiting for a second character
        events.put_nowait(finished())
        out.append((await anext(relay)).text)
        return out

    assert asyncio.run(scenario()) == ["a", "b", "c", ""]
