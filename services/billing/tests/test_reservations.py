"""Reservations against a real Redis: the arithmetic, races, settle-once,
apply and lease expiry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from mariana_common.redis_client import redis_client
from services.auth.rate_limit import RateLimiter, limits_for, token_buckets
from services.billing.reservations import LEASES, Headroom, Refusal, Reservations, reservation_key


@pytest.fixture
async def client(flush_redis: str) -> AsyncIterator[redis.Redis]:
    c = redis_client(flush_redis)
    yield c
    await c.aclose()


async def test_a_burst_of_concurrent_reservations_never_passes_the_hard_budget(client: redis.Redis) -> None:
    reservations = Reservations(client)
    await reservations.set_hard_limit("t", "", 1000)
    results = await asyncio.gather(*(reservations.reserve(f"r{i}", "t", "k", 50, 10, 60_000, []) for i in range(200)))
    admitted = [r for r in results if r is None]
    assert len(admitted) == 20  # 20 x 50 = the budget, exactly
    assert {r.reason for r in results if r is not None} == {"tenant"}
    assert (await reservations.scope("t"))["reserved"] == 1000


async def test_a_key_budget_binds_as_well_as_the_tenants(client: redis.Redis) -> None:
    reservations = Reservations(client)
    await reservations.set_hard_limit("t", "k", 120)
    assert await reservations.reserve("a", "t", "k", 100, 1, 60_000, []) is None
    refused = await reservations.reserve("b", "t", "k", 100, 1, 60_000, [])
    assert refused is not None and refused.reason == "key"
    assert await reservations.reserve("c", "t", "other-key", 100, 1, 60_000, []) is None


async def test_settle_gives_back_the_unused_part_once(client: redis.Redis) -> None:
    reservations = Reservations(client)
    await reservations.set_hard_limit("t", "", 100)
    assert await reservations.reserve("a", "t", "k", 80, 1, 60_000, []) is None
    assert await reservations.settle("a", 30, 1)
    assert not await reservations.settle("a", 0, 0)  # settled already: nothing changes
    assert (await reservations.scope("t"))["reserved"] == 30
    assert await reservations.reserve("b", "t", "k", 70, 1, 60_000, []) is None
    refused = await reservations.reserve("c", "t", "k", 1, 1, 60_000, [])
    assert refused is not None


async def test_apply_turns_the_reservation_into_spend(client: redis.Redis) -> None:
    reservations = Reservations(client)
    await reservations.set_hard_limit("t", "", 100)
    await reservations.reserve("a", "t", "k", 80, 1, 60_000, [])
    await reservations.settle("a", 30, 1)
    await reservations.apply("a", "t", "k", 30)
    tenant, key = await reservations.scope("t"), await reservations.scope("t", "k")
    assert (tenant["spent"], tenant["reserved"], key["spent"], key["reserved"]) == (30, 0, 30, 0)
    assert not await client.exists(reservation_key("a"))
    assert await client.zcard(LEASES) == 0
    # Usage whose reservation is gone (released at lease end) still counts.
    await reservations.apply("late", "t", "k", 5)
    assert (await reservations.scope("t"))["spent"] == 35


async def test_a_reservation_whose_lease_ended_is_released(client: redis.Redis) -> None:
    reservations = Reservations(client)
    await reservations.set_hard_limit("t", "", 100)
    await reservations.reserve("dead", "t", "k", 90, 1, 50, [])
    await reservations.reserve("alive", "t", "k", 10, 1, 60_000, [])
    assert await reservations.release_expired() == []
    released: list[str] = []
    for _ in range(100):  # the lease runs on Redis's clock: poll until it has passed
        if released := await reservations.release_expired():
            break
        await asyncio.sleep(0.01)
    assert released == ["dead"]
    assert (await reservations.scope("t"))["reserved"] == 10


async def test_a_reservation_settled_to_nothing_applies_and_expires_cleanly(client: redis.Redis) -> None:
    """A request cut off before its first token settles to 0; Lua's -0 once
    reached Redis as "-0", which HINCRBY refuses, and stopped billing."""
    reservations = Reservations(client)
    for request_id, lease_ms in (("cut", 60_000), ("cut-and-gone", 50)):
        assert await reservations.reserve(request_id, "t", "k", 80, 1, lease_ms, []) is None
        assert await reservations.settle(request_id, 0, 0)
    await reservations.apply("cut", "t", "k", 0)
    released: list[str] = []
    for _ in range(100):
        if released := await reservations.release_expired():
            break
        await asyncio.sleep(0.01)
    assert released == ["cut-and-gone"]
    tenant, key = await reservations.scope("t"), await reservations.scope("t", "k")
    assert (tenant["spent"], tenant["reserved"], key["spent"], key["reserved"]) == (0, 0, 0, 0)


async def test_reserving_the_same_request_twice_takes_once(client: redis.Redis) -> None:
    reservations = Reservations(client)
    await reservations.reserve("a", "t", "k", 40, 1, 60_000, [])
    await reservations.reserve("a", "t", "k", 40, 1, 60_000, [])
    assert (await reservations.scope("t"))["reserved"] == 40


async def test_worst_case_tokens_come_from_the_buckets_and_unused_ones_go_back(client: redis.Redis) -> None:
    limiter, reservations = RateLimiter(client), Reservations(client)
    limits = limits_for("k", "t", key_rpm=None, key_tpm=1000, tenant_rpm=None, tenant_tpm=None)
    assert (await limiter.admit(limits)).allowed  # auth made the bucket (cap 1000/min)
    buckets = token_buckets("k", "t")  # the tenant has no TPM limit: its bucket does not exist
    assert await reservations.reserve("a", "t", "k", 1, 600, 60_000, buckets) is None
    refused = await reservations.reserve("b", "t", "k", 1, 600, 60_000, buckets)
    assert refused is not None and refused.reason == "tokens" and 10_000 <= refused.retry_after_ms <= 13_000
    await reservations.settle("a", 1, 100)  # it used 100 of its 600
    assert await reservations.reserve("c", "t", "k", 1, 600, 60_000, buckets) is None
    too_big = await reservations.reserve("d", "t", "k", 1, 5000, 60_000, buckets)
    assert too_big is not None and too_big.reason == "too_large"


async def test_a_reservation_tells_what_is_left_after_it(client: redis.Redis) -> None:
    limiter, reservations = RateLimiter(client), Reservations(client)
    assert await reservations.admit("a", "t", "k", 10, 5, 60_000, []) == Headroom(None, None)  # no limits at all
    await reservations.set_hard_limit("t", "", 1000)
    await reservations.set_hard_limit("t", "k", 300)
    assert await reservations.admit("b", "t", "k", 100, 5, 60_000, []) == Headroom(190, None)  # the key's is nearer
    assert await reservations.admit("c", "t", "other", 100, 5, 60_000, []) == Headroom(790, None)
    assert await reservations.admit("c", "t", "other", 100, 5, 60_000, []) is None  # a retry: not known
    limits = limits_for("k", "t", key_rpm=None, key_tpm=1000, tenant_rpm=None, tenant_tpm=None)
    assert (await limiter.admit(limits)).allowed
    headroom = await reservations.admit("d", "t", "k", 50, 600, 60_000, token_buckets("k", "t"))
    assert isinstance(headroom, Headroom) and headroom.money_micros == 140
    assert headroom.tokens is not None and 400 <= headroom.tokens <= 402  # 1000 - 600, and a few ms of refill
    refused = await reservations.admit("e", "t", "k", 141, 1, 60_000, [])
    assert isinstance(refused, Refusal) and refused.reason == "key"
