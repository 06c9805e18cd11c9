"""Token buckets in a real Redis: bursts, several replicas, debits, outages."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.asyncio as redis

from mariana_common.errors import Unavailable
from mariana_common.sql import Database
from services.auth.authorizer import Authorizer, RateLimited
from services.auth.rate_limit import RateLimiter, limits_for, token_buckets
from services.auth.store import KeyStore
from services.billing.reservations import Reservations


async def test_a_burst_admits_exactly_the_limit(flush_redis: str) -> None:
    # Two "replicas", each with its own client, share the buckets.
    replicas = [RateLimiter(redis.Redis.from_url(flush_redis)) for _ in range(2)]
    limits = limits_for("k1", "t1", key_rpm=20, key_tpm=None, tenant_rpm=None, tenant_tpm=None)
    decisions = await asyncio.gather(*(replicas[i % 2].admit(limits) for i in range(60)))
    assert sum(d.allowed for d in decisions) == 20
    refused = [d for d in decisions if not d.allowed]
    assert all(d.exceeded == "requests" and d.retry_after_s >= 1 for d in refused)
    assert refused[0].headers["x-ratelimit-limit-requests"] == "20"
    assert refused[0].headers["x-ratelimit-remaining-requests"] == "0"


async def test_tenant_limit_spans_its_keys_and_is_all_or_nothing(flush_redis: str) -> None:
    client = redis.Redis.from_url(flush_redis)
    limiter = RateLimiter(client)
    a = limits_for("ka", "t1", key_rpm=5, key_tpm=None, tenant_rpm=6, tenant_tpm=None)
    b = limits_for("kb", "t1", key_rpm=5, key_tpm=None, tenant_rpm=6, tenant_tpm=None)
    results = [await limiter.admit(a) for _ in range(5)] + [await limiter.admit(b) for _ in range(5)]
    assert [r.allowed for r in results] == [True] * 5 + [True] + [False] * 4
    # A refusal took nothing from key kb's own bucket: it was refused as a whole.
    level = float(await client.hget("mariana:rl:key:kb:rpm", "tokens") or 0)
    assert 3.9 < level < 4.1


async def test_tokens_reserved_by_the_router_empty_the_bucket_auth_admits_by(flush_redis: str) -> None:
    client = redis.Redis.from_url(flush_redis)
    limiter = RateLimiter(client)
    limits = limits_for("k", "t", key_rpm=None, key_tpm=1000, tenant_rpm=None, tenant_tpm=None)
    assert (await limiter.admit(limits)).allowed  # creates the bucket, takes nothing yet
    reservations = Reservations(client)
    assert await reservations.reserve("r1", "t", "k", 10, 1000, 60_000, token_buckets("k", "t")) is None
    refused = await limiter.admit(limits)
    assert not refused.allowed and refused.exceeded == "tokens"
    assert refused.retry_after_s <= 1  # one token of a 1000/min refill
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"


async def test_redis_down_fails_open_or_closed(tmp_path: object) -> None:
    from pathlib import Path

    store = KeyStore(Database(f"sqlite:///{Path(str(tmp_path)) / 'k.db'}"), b"p" * 32)
    key = store.create_key(store.create_tenant("acme", rpm=5).id)
    dead = RateLimiter(redis.Redis(port=1, socket_connect_timeout=0.2))
    open_ = Authorizer(store, None, limiter=dead, fail_open=True)
    assert (await open_.authorize(f"Bearer {key.secret}", "/v1/models")).rate.allowed
    assert open_.limiter_failures == 1
    started = time.monotonic()  # Redis failed a moment ago: the next check does not wait for it again
    assert (await open_.authorize(f"Bearer {key.secret}", "/v1/models")).rate.allowed
    assert time.monotonic() - started < 0.1 and open_.limiter_failures == 2
    closed = Authorizer(store, None, limiter=dead, fail_open=False)
    with pytest.raises(Unavailable):
        await closed.authorize(f"Bearer {key.secret}", "/v1/models")


async def test_authorizer_refuses_over_the_limit(flush_redis: str, tmp_path: object) -> None:
    from pathlib import Path

    store = KeyStore(Database(f"sqlite:///{Path(str(tmp_path)) / 'k.db'}"), b"p" * 32)
    key = store.create_key(store.create_tenant("acme").id, rpm=2)
    authorizer = Authorizer(store, None, limiter=RateLimiter(redis.Redis.from_url(flush_redis)))
    for _ in range(2):
        assert (await authorizer.authorize(f"Bearer {key.secret}", "/v1/models")).rate.allowed
    with pytest.raises(RateLimited) as refused:
        await authorizer.authorize(f"Bearer {key.secret}", "/v1/models")
    assert refused.value.decision.retry_after_s >= 1


async def evalsha_calls(client: redis.Redis) -> int:
    stats = await client.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


async def test_a_busy_key_takes_request_tokens_in_leases(flush_redis: str) -> None:
    client = redis.Redis.from_url(flush_redis)
    limiter = RateLimiter(client)
    limits = limits_for("k", "t", key_rpm=100_000, key_tpm=None, tenant_rpm=None, tenant_tpm=1_000_000)
    before = await evalsha_calls(client)
    decisions = [await limiter.admit(limits) for _ in range(300)]
    calls = await evalsha_calls(client) - before
    assert all(d.allowed for d in decisions)
    assert calls < 30  # 1, 2, 4, ... then leases of 64 (1% of the limit at most)
    # What the client is told counts the tokens this replica holds as remaining.
    remaining = [int(d.headers["x-ratelimit-remaining-requests"]) for d in decisions]
    assert max(remaining) < 100_000 and remaining[-1] < remaining[0]
    assert all(d.headers["x-ratelimit-limit-tokens"] == "1000000" for d in decisions)


async def test_leases_never_admit_more_than_the_limit(flush_redis: str) -> None:
    # 300 a minute: leases of at most 3 tokens; two replicas, a burst of 900.
    replicas = [RateLimiter(redis.Redis.from_url(flush_redis)) for _ in range(2)]
    limits = limits_for("k", "t", key_rpm=300, key_tpm=None, tenant_rpm=None, tenant_tpm=None)
    admitted = 0
    for _ in range(450):
        decisions = await asyncio.gather(*(replica.admit(limits) for replica in replicas))
        admitted += sum(d.allowed for d in decisions)
    # Never more; fewer only by what a replica's last lease holds unused (refill adds ~1 in the run).
    assert 300 - 2 * 3 <= admitted <= 302


async def test_a_lease_that_ends_unused_makes_the_next_one_smaller(flush_redis: str) -> None:
    now = [0.0]
    client = redis.Redis.from_url(flush_redis)
    limiter = RateLimiter(client, clock=lambda: now[0])
    limits = limits_for("k", "t", key_rpm=6_000, key_tpm=None, tenant_rpm=None, tenant_tpm=None)
    for _ in range(7):  # leases of 1, 2, 4: used up at once
        assert (await limiter.admit(limits)).allowed
    level = float(await client.hget("mariana:rl:key:k:rpm", "tokens") or 0)
    assert 6_000 - 7 <= level <= 6_000 - 7 + 2  # nothing held back yet (Redis refills 0.1 a ms)
    assert (await limiter.admit(limits)).allowed  # a lease of 8: 7 held here
    now[0] += 1.0  # it ends unused
    assert (await limiter.admit(limits)).allowed  # the next lease is 4: 3 held
    level_after = float(await client.hget("mariana:rl:key:k:rpm", "tokens") or 0)
    assert 8 + 4 - 2 <= level - level_after <= 8 + 4
