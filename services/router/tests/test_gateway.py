"""The gateway's logic with in-memory stand-ins for inference and moderation
(the real ones are exercised by the integration and end-to-end tests)."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence

import pytest

from mariana_common.errors import InvalidArgument
from services.router.catalog import Catalog
from services.router.domain import (
    Caller,
    Direction,
    GenerationRequest,
    Inference,
    ModelEntry,
    Moderation,
    ModerationVerdict,
    Piece,
    Sampling,
    UsageRecord,
    UsageSink,
)
from services.router.gateway import Gateway
from services.router.routing import ModelRouter

CALLER = Caller("tenant-1", "key-1", "req-1")
ONE_POOL = Catalog.model_validate({"pools": {"p": {"upstream": "up", "model": "m"}}, "models": {"m": {"pools": ["p"]}}})


def make_gateway(
    inference: Inference, moderation: Moderation, usage: UsageSink, output_window_chars: int = 32
) -> Gateway:
    """The gateway over a one-pool catalog whose pool is `inference`."""
    router = ModelRouter(lambda: ONE_POOL, lambda name, config: inference)
    return Gateway(router, inference, moderation, usage, output_window_chars)


class ScriptedInference:
    def __init__(self, texts: list[str], finish: str = "stop") -> None:
        self.texts = texts
        self.finish = finish
        self.requests: list[GenerationRequest] = []

    async def generate(
        self, request: GenerationRequest, request_id: str, timeout_s: float | None = None, stream: bool = True
    ) -> AsyncGenerator[Piece, None]:
        self.requests.append(request)
        for i, text in enumerate(self.texts, start=1):
            yield Piece(text, None, 12, i)
        yield Piece("", self.finish, 12, len(self.texts))

    async def embed(self, model: str, texts: Sequence[str], request_id: str) -> tuple[list[list[float]], int]:
        return [[1.0] for _ in texts], len(texts)

    async def models(self) -> list[ModelEntry]:
        return [ModelEntry("m", 0)]


class RuleModeration:
    """Input: 'secret' blocks, 'mail@x.org' is redacted. Output: 'evil' blocks."""

    def __init__(self) -> None:
        self.calls: list[tuple[Direction, list[str]]] = []

    async def check(
        self,
        texts: Sequence[str],
        request_id: str,
        tenant_id: str = "",
        direction: Direction = "input",
        context: str = "",
        contexts: Sequence[str] = (),
        decision_only: bool = True,
    ) -> list[ModerationVerdict]:
        self.calls.append((direction, list(texts)))
        verdicts = []
        for text in texts:
            if direction == "input" and "secret" in text:
                verdicts.append(ModerationVerdict(True, {}, {}, "block", ("blocklist (term)",)))
            elif direction == "input" and "mail@x.org" in text:
                redacted = text.replace("mail@x.org", "[EMAIL]")
                verdicts.append(ModerationVerdict(True, {}, {}, "redact", ("pii (email)",), redacted))
            elif direction == "output" and "evil" in text:
                verdicts.append(ModerationVerdict(True, {}, {}, "block", ("violence",)))
            else:
                verdicts.append(ModerationVerdict(False, {}, {}, "allow", (), text))
        return verdicts


class RecordingSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []
        self.released: list[str] = []

    def publish(self, record: UsageRecord) -> None:
        self.records.append(record)

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


def chat(text: str) -> GenerationRequest:
    return GenerationRequest("m", messages=[("system", "be nice"), ("user", text)])


async def collect(gateway: Gateway, request: GenerationRequest) -> list[Piece]:
    return [p async for p in gateway.generate(CALLER, request)]


async def test_generation_publishes_one_usage_record() -> None:
    sink = RecordingSink()
    gateway = make_gateway(ScriptedInference(["Hel", "lo"]), RuleModeration(), sink, output_window_chars=0)
    pieces = await collect(gateway, chat("hi"))
    assert "".join(p.text for p in pieces) == "Hello"
    (record,) = sink.records
    assert (record.request_id, record.tenant_id, record.key_id) == ("req-1", "tenant-1", "key-1")
    assert (record.prompt_tokens, record.completion_tokens, record.finish_reason) == (12, 2, "stop")


async def test_blocked_input_never_reaches_inference() -> None:
    inference, sink = ScriptedInference(["x"]), RecordingSink()
    gateway = make_gateway(inference, RuleModeration(), sink)
    with pytest.raises(InvalidArgument, match=r"blocklist \(term\)"):
        await collect(gateway, chat("my secret plan"))
    assert inference.requests == [] and sink.records == []


async def test_redacted_input_is_what_inference_sees() -> None:
    inference = ScriptedInference(["ok"])
    gateway = make_gateway(inference, RuleModeration(), RecordingSink())
    await collect(gateway, chat("write to mail@x.org"))
    assert inference.requests[0].messages == [("system", "be nice"), ("user", "write to [EMAIL]")]


async def test_blocked_output_ends_with_content_filter_and_is_billed() -> None:
    sink = RecordingSink()
    texts = ["Once upon ", "a time ", "something ", "evil ", "happened ", "there."]
    gateway = make_gateway(ScriptedInference(texts), RuleModeration(), sink, output_window_chars=8)
    pieces = await collect(gateway, chat("tell a story"))
    sent = "".join(p.text for p in pieces)
    assert "evil" not in sent and sent.startswith("Once upon")
    assert pieces[-1].finish_reason == "content_filter"
    (record,) = sink.records
    # Billed for what inference had generated when the window was checked.
    assert record.finish_reason == "content_filter" and 4 <= record.completion_tokens <= len(texts)


async def test_cancelled_stream_bills_the_tokens_made() -> None:
    sink = RecordingSink()
    gateway = make_gateway(ScriptedInference(["a ", "b ", "c "]), RuleModeration(), sink, output_window_chars=0)
    stream = gateway.generate(CALLER, chat("hi"))
    assert (await anext(stream)).text == "a "
    assert (await anext(stream)).text == "b "
    await stream.aclose()
    (record,) = sink.records
    assert (record.finish_reason, record.completion_tokens) == ("cancelled", 2)


async def test_several_choices_are_billed_once_with_completions_summed() -> None:
    sink = RecordingSink()
    gateway = make_gateway(ScriptedInference(["a ", "b ", "c "]), RuleModeration(), sink, output_window_chars=0)
    pieces = [p async for p in gateway.generate(CALLER, chat("hi"), n=3)]
    by_choice = {i: "".join(p.text for p in pieces if p.index == i) for i in range(3)}
    assert by_choice == {0: "a b c ", 1: "a b c ", 2: "a b c "}
    assert [p.finish_reason for p in pieces if p.finish_reason] == ["stop"] * 3
    (record,) = sink.records
    assert (record.prompt_tokens, record.completion_tokens) == (12, 9)


async def test_several_choices_get_distinct_seeds() -> None:
    inference = ScriptedInference(["x"])
    gateway = make_gateway(inference, RuleModeration(), RecordingSink(), output_window_chars=0)
    request = GenerationRequest("m", prompt="hi", sampling=Sampling(seed=7))
    [p async for p in gateway.generate(CALLER, request, n=3)]
    assert sorted(r.sampling.seed for r in inference.requests) == [7, 8, 9]  # type: ignore[type-var]


async def test_an_answer_not_streamed_is_moderated_in_one_call() -> None:
    moderation, sink = RuleModeration(), RecordingSink()
    texts = ["Once upon ", "a time ", "there was ", "a quiet ", "village ", "by the sea."]
    gateway = make_gateway(ScriptedInference(texts), moderation, sink, output_window_chars=8)
    pieces = [p async for p in gateway.generate(CALLER, chat("tell a story"), stream=False)]
    assert "".join(p.text for p in pieces) == "".join(texts)
    assert pieces[-1].text == "".join(texts)  # the whole text comes with the last piece
    output_calls = [texts for direction, texts in moderation.calls if direction == "output"]
    assert len(output_calls) == 1 and len(output_calls[0]) > 1  # several windows, one call
    assert "".join(output_calls[0]) == "".join(texts)
    assert sink.records[0].completion_tokens == len(texts)


async def test_a_blocked_answer_not_streamed_is_withheld_and_billed() -> None:
    sink = RecordingSink()
    texts = ["Once upon ", "a time ", "something ", "evil ", "happened ", "there."]
    gateway = make_gateway(ScriptedInference(texts), RuleModeration(), sink, output_window_chars=8)
    pieces = [p async for p in gateway.generate(CALLER, chat("tell a story"), stream=False)]
    assert "".join(p.text for p in pieces) == ""
    assert pieces[-1].finish_reason == "content_filter"
    (record,) = sink.records
    assert (record.finish_reason, record.completion_tokens) == ("content_filter", len(texts))
