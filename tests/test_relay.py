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
