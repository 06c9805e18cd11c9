"""The gateway's logic with in-memory stand-ins for inference and moderation
(the real ones are exercised by the integration and end-to-end tests)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest

from mariana_common.errors import InvalidArgument
from services.router.domain import (
    Caller,
    GenerationRequest,
    ModelEntry,
    ModerationVerdict,
    Piece,
    UsageRecord,
)
from services.router.gateway import Gateway

CALLER = Caller("tenant-1", "key-1", "req-1")


class ScriptedInference:
    def __init__(self, pieces: list[Piece]) -> None:
        self.pieces = pieces
        self.calls = 0

    async def generate(self, request: GenerationRequest, request_id: str) -> AsyncIterator[Piece]:
        self.calls += 1
        for piece in self.pieces:
            yield piece

    async def embed(self, model: str, texts: Sequence[str], request_id: str) -> tuple[list[list[float]], int]:
        return [[1.0] for _ in texts], len(texts)

    async def models(self) -> list[ModelEntry]:
        return [ModelEntry("m", 0)]


class KeywordModeration:
    async def check(self, texts: Sequence[str], request_id: str) -> list[ModerationVerdict]:
        return [ModerationVerdict("secret" in t, {"blocklist": "secret" in t}, {}) for t in texts]


class RecordingSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def publish(self, record: UsageRecord) -> None:
        self.records.append(record)


PIECES = [Piece("Hel"), Piece("lo"), Piece("", "stop", 12, 2)]


async def test_generation_publishes_one_usage_record() -> None:
    sink = RecordingSink()
    gateway = Gateway(ScriptedInference(PIECES), KeywordModeration(), sink)
    pieces = [p async for p in gateway.generate(CALLER, GenerationRequest("m", messages=[("user", "hi")]))]
    assert "".join(p.text for p in pieces) == "Hello"
    (record,) = sink.records
    assert (record.request_id, record.tenant_id, record.key_id) == ("req-1", "tenant-1", "key-1")
    assert (record.prompt_tokens, record.completion_tokens, record.finish_reason) == (12, 2, "stop")


async def test_flagged_input_never_reaches_inference() -> None:
    inference, sink = ScriptedInference(PIECES), RecordingSink()
    gateway = Gateway(inference, KeywordModeration(), sink)
    request = GenerationRequest("m", messages=[("system", "ok"), ("user", "my secret plan")])
    with pytest.raises(InvalidArgument, match="blocklist"):
        [p async for p in gateway.generate(CALLER, request)]
    assert inference.calls == 0
    assert sink.records == []


async def test_abandoned_stream_publishes_nothing_yet() -> None:
    sink = RecordingSink()
    gateway = Gateway(ScriptedInference(PIECES), KeywordModeration(), sink)
    stream = gateway.generate(CALLER, GenerationRequest("m", prompt="hi"))
    assert (await anext(stream)).text == "Hel"
    await stream.aclose()
    assert sink.records == []
