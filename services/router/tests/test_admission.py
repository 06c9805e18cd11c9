"""Admission by worst-case cost, with the real reservation scripts in Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from mariana_common.errors import ResourceExhausted
from mariana_common.redis_client import redis_client
from services.billing.prices import load_prices
from services.billing.reservations import Reservations
from services.router.admission import TEMPLATE_TOKENS_FIXED, TEMPLATE_TOKENS_PER_MESSAGE, Admission, PromptCounter
from services.router.catalog import Catalog
from services.router.domain import Caller, GenerationRequest, Sampling
from services.router.gateway import Gateway
from services.router.routing import ModelRouter
from services.router.tests.test_cache import Switchable
from services.router.tests.test_gateway import RecordingSink, RuleModeration

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


def gateway(client: aioredis.Redis, sink: RecordingSink, inference: Switchable) -> Gateway:
    catalog = Catalog.model_validate(
        {
            "pools": {"p": {"upstream": "u", "model": MODEL}},
            "models": {MODEL: {"pools": ["p"]}},
            "retry": {"retries": 0},
        }
    )
    admission = Admission(Reservations(client), load_prices(), PromptCounter(None), lease_s=60)
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
