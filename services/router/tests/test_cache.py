"""The response cache against a real Redis (the suite's own redis-server)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import pytest
import redis.asyncio as aioredis

from mariana_common.errors import Unavailable
from services.router.cache import INDEX, CachedAnswer, ResponseCache, cache_key
from services.router.catalog import CacheConfig, Catalog
from services.router.domain import Caller, GenerationRequest, Piece, Sampling
from services.router.gateway import Gateway
from services.router.routing import ModelRouter, Route
from services.router.tests.test_gateway import RecordingSink, RuleModeration, ScriptedInference

GREEDY = Sampling(temperature=0)


def request(text: str = "hi", sampling: Sampling = GREEDY) -> GenerationRequest:
    return GenerationRequest("m", messages=[("user", text)], sampling=sampling)


def test_only_deterministic_single_answers_are_cacheable() -> None:
    assert cache_key("t", "m", request(), 1) is not None
    assert cache_key("t", "m", request(sampling=Sampling(temperature=0.7, seed=3)), 1) is not None
    assert cache_key("t", "m", request(sampling=Sampling(temperature=0.7)), 1) is None
    assert cache_key("t", "m", request(), 2) is None
    assert cache_key("t", "m", request(sampling=Sampling(temperature=0, logprobs=True)), 1) is None


def test_keys_separate_tenants_and_every_part_of_the_request() -> None:
    base = cache_key("t1", "m", request(), 1)
    assert base != cache_key("t2", "m", request(), 1)
    assert base != cache_key("t1", "m2", request(), 1)
    assert base != cache_key("t1", "m", request("hello"), 1)
    assert base != cache_key("t1", "m", request(sampling=Sampling(temperature=0, max_tokens=5)), 1)
    assert base == cache_key("t1", "m", request(), 1)
    assert base is not None and base.startswith("mariana:cache:t1:")


@pytest.fixture
async def client(flush_redis: str) -> AsyncIterator[aioredis.Redis]:
    c = aioredis.Redis.from_url(flush_redis)
    yield c
    await c.aclose()


def answer(text: str, at: float) -> CachedAnswer:
    return CachedAnswer(text, "stop", 3, 2, at)


async def test_an_entry_is_fresh_then_stale_then_gone(client: aioredis.Redis) -> None:
    now = [1000.0]
    cache = ResponseCache(client, lambda: CacheConfig(ttl_s=10, stale_s=60), clock=lambda: now[0])
    await cache.put("mariana:cache:t:k", answer("hello", now[0]))
    now[0] += 5
    hit = await cache.get("mariana:cache:t:k")
    assert hit is not None and hit.fresh and hit.answer.text == "hello"
    now[0] += 10
    stale = await cache.get("mariana:cache:t:k")
    assert stale is not None and not stale.fresh
    ttl_ms = await client.pttl("mariana:cache:t:k")
    assert 60_000 < ttl_ms <= 70_000  # gone from Redis after ttl + stale
    assert (cache.counters.hits, cache.counters.misses) == (1, 1)


async def test_the_cache_is_bounded_in_entries_and_entry_size(client: aioredis.Redis) -> None:
    cache = ResponseCache(client, lambda: CacheConfig(max_entries=3, max_entry_bytes=200))
    for i in range(5):
        await cache.put(f"mariana:cache:t:{i}", answer(f"answer {i}", 1000.0 + i))
    await cache.put("mariana:cache:t:big", answer("x" * 500, 2000.0))
    assert await client.zcard(INDEX) == 3
    assert [await client.exists(f"mariana:cache:t:{i}") for i in range(5)] == [0, 0, 1, 1, 1]
    assert not await client.exists("mariana:cache:t:big")


async def test_opted_out_tenants_get_no_key(client: aioredis.Redis) -> None:
    cache = ResponseCache(client, lambda: CacheConfig(exclude_tenants=["private"]))
    assert cache.key_for("private", "m", request(), 1) is None
    assert cache.key_for("other", "m", request(), 1) is not None


async def test_redis_down_means_no_cache_not_an_error() -> None:
    down = aioredis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)
    cache = ResponseCache(down, lambda: CacheConfig())
    assert await cache.get("mariana:cache:t:k") is None
    await cache.put("mariana:cache:t:k", answer("x", 1.0))  # skipped: Redis failed a moment ago
    started = asyncio.get_running_loop().time()
    assert await cache.get("mariana:cache:t:k") is None
    assert asyncio.get_running_loop().time() - started < 0.05  # no second wait for a timeout
    assert cache.counters.errors == 2
    await down.aclose()


class Switchable(ScriptedInference):
    def __init__(self, texts: list[str]) -> None:
        super().__init__(texts)
        self.down = False

    async def generate(
        self, request: GenerationRequest, request_id: str, timeout_s: float | None = None, stream: bool = True
    ) -> AsyncGenerator[Piece, None]:
        if self.down:
            raise Unavailable("down")
        async for piece in super().generate(request, request_id, timeout_s):
            yield piece


def cached_gateway(
    client: aioredis.Redis,
    inference: Switchable,
    ttl_s: float = 60,
    moderation: RuleModeration | None = None,
    cache_type: type[ResponseCache] = ResponseCache,
    clock: Callable[[], float] = time.time,
) -> Gateway:
    catalog = Catalog.model_validate(
        {
            "pools": {"p": {"upstream": "up", "model": "m"}},
            "models": {"m": {"pools": ["p"]}},
            "cache": {"ttl_s": ttl_s, "stale_s": 600},
            "retry": {"retries": 0},
        }
    )
    router = ModelRouter(lambda: catalog, lambda name, config: inference)
    cache = cache_type(client, lambda: catalog.cache, clock)
    return Gateway(router, inference, moderation or RuleModeration(), RecordingSink(), 0, cache)


async def run(gateway: Gateway, caller: Caller, req: GenerationRequest) -> tuple[str, Route]:
    route = Route()
    text = "".join([p.text async for p in gateway.generate(caller, req, stream=False, route=route)])
    return text, route


async def test_a_repeated_deterministic_request_is_served_from_cache_for_its_tenant_only(
    client: aioredis.Redis,
) -> None:
    inference = Switchable(["Hel", "lo"])
    gateway = cached_gateway(client, inference)
    alice, bob = Caller("alice", "k1", "r1"), Caller("bob", "k2", "r2")
    assert await run(gateway, alice, request()) == ("Hello", Route("m", "p", "primary", 1, "closed"))
    text, route = await run(gateway, alice, request())
    assert (text, route.step) == ("Hello", "cache")
    assert len(inference.requests) == 1
    _, route = await run(gateway, bob, request())
    assert route.step == "primary" and len(inference.requests) == 2


async def test_when_nothing_can_serve_a_stale_answer_is_served_and_marked(client: aioredis.Redis) -> None:
    inference = Switchable(["Hel", "lo"])
    now = [1000.0]
    gateway = cached_gateway(client, inference, ttl_s=60, clock=lambda: now[0])
    caller = Caller("alice", "k1", "r1")
    await run(gateway, caller, request())
    now[0] += 61  # past the TTL, within the stale window
    inference.down = True
    text, route = await run(gateway, caller, request())
    assert (text, route.step) == ("Hello", "stale_cache")
    with pytest.raises(Unavailable):  # nothing cached for this one: a clean 503
        await run(gateway, caller, request("something else"))


async def test_moderation_runs_while_the_cache_is_looked_up(client: aioredis.Redis) -> None:
    events: list[str] = []

    class SlowModeration(RuleModeration):
        async def check(
            self, texts, request_id, tenant_id="", direction="input", context="", contexts=(), decision_only=True
        ):  # type: ignore[no-untyped-def]
            events.append(f"{direction} start")
            await asyncio.sleep(0.05)
            events.append(f"{direction} end")
            return await super().check(texts, request_id, tenant_id, direction, context, contexts, decision_only)

    class WatchedCache(ResponseCache):
        async def get(self, key: str):  # type: ignore[no-untyped-def]
            events.append("cache start")
            result = await super().get(key)
            events.append("cache end")
            return result

    inference = Switchable(["ok"])
    gateway = cached_gateway(client, inference, moderation=SlowModeration(), cache_type=WatchedCache)
    await run(gateway, Caller("t", "k", "r"), request())
    assert events.index("cache start") < events.index("input end")
