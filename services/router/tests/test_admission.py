"""Admission by worst-case cost, with the real reservation scripts in Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from mariana_common.errors import ResourceExhausted
from mariana_common.redis_client import redis_client
from services.billing.prices import load_prices
from services.billing.reservations import Headroom, Refusal, Reservations
from services.router.admission import (
    OVERLAPPED_PER_KEY,
    TEMPLATE_TOKENS_FIXED,
    TEMPLATE_TOKENS_PER_MESSAGE,
    Admission,
    PromptCounter,
)
from services.router.catalog import Catalog
from services.router.domain import Caller, GenerationRequest, Piece, Sampling
from services.router.gateway import Gateway
from services.router.routing import ModelRouter
from services.router.tests.test_cache import Switchable
from services.router.tests.test_gateway import RecordingSink, RuleModeration
from tests.waiting import until

MODEL = "smollm2-135m-instruct"


@pytest.fixture
async def client(flush_redis: str) -> AsyncIterator[aioredis.Redis]:
    c = redis_client(flush_redis)
    yield c
    await c.aclose()


def test_the_prompt_bound_is_never_below_the_models_own_count(model_dir: object) -> None:
    from pathlib import Path

    from transformers import AutoTokenizer

    directory = Path(str(model_dir))
    counter = PromptCounter(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    chats = [
        [("user", "What is the capital of France?")],
        [
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Tell me a long story about ships."),
        ],
        [("user", "")],
        [("user", "Ünïcödé, emoji 🚀 and 中文 text")],
    ]
    for chat in chats:
        rendered = tokenizer.apply_chat_template(
            [{"role": r, "content": t} for r, t in chat], add_generation_prompt=True, tokenize=False
        )
        exact = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
        bound = counter.count([t for _, t in chat])
        assert exact <= bound <= exact + TEMPLATE_TOKENS_FIXED + TEMPLATE_TOKENS_PER_MESSAGE * len(chat)


def test_without_a_tokenizer_bytes_bound_the_tokens() -> None:
    assert PromptCounter(None).count(["héllo"]) == 6 + TEMPLATE_TOKENS_PER_MESSAGE + TEMPLATE_TOKENS_FIXED


def gateway(
    client: aioredis.Redis, sink: RecordingSink, inference: Switchable, reservations: Reservations | None = None
) -> Gateway:
    catalog = Catalog.model_validate(
        {
            "pools": {"p": {"upstream": "u", "model": MODEL}},
            "models": {MODEL: {"pools": ["p"]}},
            "retry": {"retries": 0},
        }
    )
    admission = Admission(reservations or Reservations(client), load_prices(), PromptCounter(None), lease_s=60)
    router = ModelRouter(lambda: catalog, lambda name, config: inference)
    return Gateway(router, inference, RuleModeration(), sink, 0, None, admission, default_max_tokens=100)


async def test_a_request_that_could_pass_the_budget_is_refused_before_inference(client: aioredis.Redis) -> None:
    sink, inference = RecordingSink(), Switchable(["a", "b"])
    g = gateway(client, sink, inference)
    reservations = Reservations(client)
    request = GenerationRequest(MODEL, messages=[("user", "hi")], sampling=Sampling(max_tokens=1000))
    # max_tokens 1000 at 200000 micro-units per million output tokens: 200 micro-units, worst case
    await reservations.set_hard_limit("t", "", 150)
    with pytest.raises(ResourceExhausted) as refused:
        [p async for p in g.generate(Caller("t", "k", "r1"), request)]
    assert refused.value.reason == "insufficient_quota"
    assert inference.requests == []
    await reservations.set_hard_limit("t", "", 10_000)
    pieces = [p async for p in g.generate(Caller("t", "k", "r2"), request)]
    assert "".join(p.text for p in pieces) == "ab"
    (record,) = sink.records
    assert record.settle_micros is not None and 0 < record.settle_micros < 200


async def test_the_default_max_tokens_is_named_so_inference_cannot_pass_the_reservation(client: aioredis.Redis) -> None:
    sink, inference = RecordingSink(), Switchable(["a"])
    pieces = [
        p
        async for p in gateway(client, sink, inference).generate(
            Caller("t", "k", "r"), GenerationRequest(MODEL, prompt="x")
        )
    ]
    assert pieces and inference.requests[0].sampling.max_tokens == 100


async def test_a_request_that_made_nothing_gives_its_reservation_back(client: aioredis.Redis) -> None:
    sink, inference = RecordingSink(), Switchable(["a"])
    inference.down = True
    with pytest.raises(Exception):  # noqa: B017 - no pool can serve: which error is tested elsewhere
        [
            p
            async for p in gateway(client, sink, inference).generate(
                Caller("t", "k", "gone"), GenerationRequest(MODEL, prompt="x")
            )
        ]
    assert sink.released == ["gone"] and sink.records == []


class HeldReservations(Reservations):
    """Real reservations, each held until `gate` is set; `held` counts those waiting."""

    def __init__(self, client: aioredis.Redis) -> None:
        super().__init__(client)
        self.gate = asyncio.Event()
        self.gate.set()
        self.held = 0

    async def admit(self, *args: Any, **kwargs: Any) -> Refusal | Headroom | None:
        self.held += 1
        try:
            await self.gate.wait()
        finally:
            self.held -= 1
        return await super().admit(*args, **kwargs)


class ClosableInference(Switchable):
    """Counts the generations closed before their last piece was taken."""

    def __init__(self, texts: list[str]) -> None:
        super().__init__(texts)
        self.unfinished = 0

    async def generate(
        self, request: GenerationRequest, request_id: str, timeout_s: float | None = None, stream: bool = True
    ) -> AsyncGenerator[Piece, None]:
        finished = False
        try:
            async for piece in super().generate(request, request_id, timeout_s, stream):
                finished = piece.finish_reason is not None
                yield piece
        finally:
            self.unfinished += not finished


# max_tokens 1000: a worst case of 200 micro-units
BIG = GenerationRequest(MODEL, messages=[("user", "hi")], sampling=Sampling(max_tokens=1000))


async def test_with_headroom_to_spare_the_reservation_runs_beside_inference(client: aioredis.Redis) -> None:
    sink, inference, reservations = RecordingSink(), ClosableInference(["a", "b"]), HeldReservations(client)
    g = gateway(client, sink, inference, reservations)
    await reservations.set_hard_limit("t", "", 10_000)
    assert "".join([p.text async for p in g.generate(Caller("t", "k", "r1"), BIG)]) == "ab"  # ~9,800 left
    one = (await reservations.scope("t"))["reserved"]
    reservations.gate.clear()
    pieces = g.generate(Caller("t", "k", "r2"), BIG)
    first = asyncio.ensure_future(anext(pieces))
    await until(lambda: len(inference.requests) == 2, "inference started")
    await until(lambda: reservations.held == 1, "the reservation under way")
    assert not first.done()  # ...and nothing reaches the caller before the reservation
    reservations.gate.set()
    assert (await first).text + "".join([p.text async for p in pieces]) == "ab"
    assert [r.request_id for r in sink.records] == ["r1", "r2"] and sink.records[1].settle_micros is not None
    assert (await reservations.scope("t"))["reserved"] == 2 * one  # both reserved (the sink settles nothing)


async def test_refused_while_inference_runs_it_is_cancelled_and_nothing_is_billed(client: aioredis.Redis) -> None:
    sink, inference, reservations = RecordingSink(), ClosableInference(["a", "b"]), HeldReservations(client)
    g = gateway(client, sink, inference, reservations)
    await reservations.set_hard_limit("t", "", 10_000)
    [p async for p in g.generate(Caller("t", "k", "r1"), BIG)]
    await reservations.set_spent("t", "", 9_700)  # another replica spent the rest meanwhile
    with pytest.raises(ResourceExhausted) as refused:
        [p async for p in g.generate(Caller("t", "k", "r2"), BIG)]
    assert refused.value.reason == "insufficient_quota"
    assert len(inference.requests) == 2 and inference.unfinished == 1  # it started, and was closed
    assert [r.request_id for r in sink.records] == ["r1"] and sink.released == []
    with pytest.raises(ResourceExhausted):  # after a refusal, the reservation comes first again
        [p async for p in g.generate(Caller("t", "k", "r3"), BIG)]
    assert len(inference.requests) == 2


async def test_with_little_headroom_the_reservation_comes_first(client: aioredis.Redis) -> None:
    sink, inference, reservations = RecordingSink(), ClosableInference(["a"]), HeldReservations(client)
    g = gateway(client, sink, inference, reservations)
    await reservations.set_hard_limit("t", "k", 550)
    [p async for p in g.generate(Caller("t", "k", "r1"), BIG)]  # 350 left: less than twice 200
    reservations.gate.clear()
    second = asyncio.ensure_future(anext(g.generate(Caller("t", "k", "r2"), BIG)))
    await until(lambda: reservations.held == 1, "the reservation under way")
    assert len(inference.requests) == 1
    reservations.gate.set()
    assert (await second).text == "a" and len(inference.requests) == 2


async def test_a_caller_gone_before_its_reservation_came_back_gets_it_released(client: aioredis.Redis) -> None:
    sink, inference, reservations = RecordingSink(), ClosableInference(["a"]), HeldReservations(client)
    g = gateway(client, sink, inference, reservations)
    [p async for p in g.generate(Caller("t", "k", "r1"), BIG)]  # no budget: unlimited headroom
    reservations.gate.clear()
    pieces = g.generate(Caller("t", "k", "r2"), BIG)
    first = asyncio.ensure_future(anext(pieces))
    await until(lambda: len(inference.requests) == 2, "inference started")
    first.cancel()  # the caller hung up
    with pytest.raises(asyncio.CancelledError):
        await first
    assert sink.released == [] and inference.unfinished == 1
    reservations.gate.set()
    await until(lambda: sink.released == ["r2"], "released")
    assert [r.request_id for r in sink.records] == ["r1"]


async def test_a_burst_starts_only_a_few_inference_calls_before_its_reservations(client: aioredis.Redis) -> None:
    sink, inference, reservations = RecordingSink(), ClosableInference(["a"]), HeldReservations(client)
    g = gateway(client, sink, inference, reservations)
    [p async for p in g.generate(Caller("t", "k", "r0"), BIG)]  # no budget: the headroom is unlimited
    reservations.gate.clear()
    burst = [asyncio.ensure_future(anext(g.generate(Caller("t", "k", f"r{i}"), BIG))) for i in range(1, 11)]
    await until(lambda: len(inference.requests) == 1 + OVERLAPPED_PER_KEY, "the overlapped calls")
    await asyncio.sleep(0.05)
    assert len(inference.requests) == 1 + OVERLAPPED_PER_KEY  # the other six wait for their reservations
    reservations.gate.set()
    assert [(await first).text for first in burst] == ["a"] * 10
    assert len(inference.requests) == 11
