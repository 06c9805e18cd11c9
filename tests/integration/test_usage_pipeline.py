"""The usage pipeline with a real Redis and a real ledger: the router's
publisher (batches, the disk spool, replays) and billing's consumer (exactly
once, reservations into spend, failures, restarts, reclaiming, trimming,
alerts)."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from launcher.readiness import port_open, wait_until
from mariana_common.redis_client import redis_client
from mariana_common.sql import Database
from mesh.plan import free_port
from services.billing.consumer import CONSUMER_FAILURES, DEAD_LETTER_SUFFIX, UsageConsumer
from services.billing.events import decode
from services.billing.ledger import Entry, Ledger
from services.billing.prices import load_prices
from services.billing.reservations import Reservations, tenant_scope
from services.router.domain import UsageRecord
from services.router.spool import Spool
from services.router.usage import RedisUsagePublisher

MASTER = "sk-integration-master-key"


def usage(request_id: str, completion: int = 3) -> UsageRecord:
    return UsageRecord(request_id, "tenant-a", "key-a", "m", 10, completion, "stop", 1.0)


def publisher_for(client: aioredis.Redis, tmp_path: Path) -> RedisUsagePublisher:
    return RedisUsagePublisher(client, "usage", Reservations(client), Spool(tmp_path / "spool.jsonl"), retry_s=0.1)


async def test_usage_publisher_reloads_a_script_redis_lost_without_doubling_events(
    flush_redis: str, tmp_path: Path
) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    reservations = Reservations(client)
    for i in range(3):
        await reservations.reserve(f"s{i}", "tenant-a", "key-a", 100, 50, 60_000, [])
    await client.script_flush()  # as after a Redis restart
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(3):
        publisher.publish(replace(usage(f"s{i}"), settle_micros=10))
    await publisher.close(5)
    assert await client.xlen("usage") == 3
    assert (await reservations.scope("tenant-a"))["reserved"] == 3 * 10  # each settled to its real cost
    await client.aclose()


async def test_usage_is_spooled_to_disk_while_redis_is_away_and_replayed_in_order(tmp_path: Path) -> None:
    port = free_port()

    def redis_server() -> subprocess.Popen[bytes]:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        wait_until(port_open(port), "redis", time.monotonic() + 10, None)
        return server

    async def stream_ids() -> list[str]:
        return [decode(fields).request_id for _, fields in await client.xrange("usage")]

    async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
        for _ in range(200):
            try:
                if await check():
                    return
            except RedisError:  # the test's own pooled connection to the Redis that was killed
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("timed out")

    server = redis_server()
    client = redis_client(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    spool_file = tmp_path / "spool.jsonl"
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    try:
        publisher.publish(usage("before"))

        async def sent_before() -> bool:
            return await stream_ids() == ["before"]

        await eventually(sent_before)
        server.kill()
        server.wait()
        during = [f"during-{i}" for i in range(5)]
        for request_id in during:
            publisher.publish(usage(request_id))
            await asyncio.sleep(0.05)

        async def all_spooled() -> bool:
            return publisher.spool_depth == len(during)

        await eventually(all_spooled)
        # On disk, in order: a router that died now would replay them at start.
        assert [i.request_id for i in Spool(spool_file).read() if not isinstance(i, str)] == during
        server = redis_server()  # back, empty (no persistence here)
        publisher.publish(usage("after"))

        async def replayed() -> bool:
            return await stream_ids() == [*during, "after"]

        await eventually(replayed)

        async def spool_emptied() -> bool:  # the publisher clears it once the replay's round trip returns
            return publisher.spool_depth == 0

        await eventually(spool_emptied)
        assert Spool(spool_file).read() == []
    finally:
        await publisher.close(2)
        await client.aclose()
        server.kill()
        server.wait()


async def test_usage_flows_from_publisher_to_ledger_exactly_once(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(50):
        publisher.publish(usage(f"r{i}"))
    publisher.publish(usage("r7", completion=999))  # a redelivered duplicate
    await publisher.close(5)
    await client.xadd("usage", {b"event": b"\xff garbage"})

    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    consumer = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    for _ in range(100):
        if len(ledger.entries("tenant-a")) == 50 and await client.xlen("usage" + DEAD_LETTER_SUFFIX) == 1:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    entries = ledger.entries("tenant-a")
    assert len(entries) == 50
    assert {e.request_id: e.completion_tokens for e in entries}["r7"] == 3
    assert await client.xlen("usage" + DEAD_LETTER_SUFFIX) == 1
    pending = await client.xpending("usage", "billing")
    assert pending["pending"] == 0
    await client.aclose()


async def test_applied_usage_turns_reservations_into_spend_once(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    reservations = Reservations(client)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    ledger.record([Entry("old", "tenant-a", "key-a", "m", 1, 1, "stop", 1.0, 700)])  # spend from before
    ledger.set_budget("tenant-a", 10_000, 0)
    consumer = UsageConsumer(
        client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50, reservations=reservations
    )
    await consumer.sync_admission_state()  # as at start: Redis learns the ledger's spend and limits
    assert (await reservations.scope("tenant-a"))["spent"] == 700
    assert (await reservations.scope("tenant-a"))["hard"] == 10_000
    for i in range(3):
        assert await reservations.reserve(f"q{i}", "tenant-a", "key-a", 1000, 50, 60_000, []) is None
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(3):
        publisher.publish(replace(usage(f"q{i}"), settle_micros=1))
    publisher.publish(replace(usage("q0"), settle_micros=1))  # a duplicate changes nothing
    await publisher.close(5)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    for _ in range(100):
        if (await reservations.scope("tenant-a")).get("reserved", -1) == 0:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    cost = sum(e.cost_micros for e in ledger.entries("tenant-a"))
    scope = await reservations.scope("tenant-a")
    assert (scope["spent"], scope["reserved"]) == (cost, 0)
    assert len(ledger.entries("tenant-a")) == 4
    await client.aclose()


async def test_the_consumer_outlives_a_batch_that_fails_and_applies_it_later(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    reservations = Reservations(client)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    consumer = UsageConsumer(
        client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50, reservations=reservations
    )
    # The tenant's budget counters are unusable (here: the wrong Redis type), so applying fails.
    await client.set(tenant_scope("tenant-a"), "not a hash")
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    publisher.publish(usage("r1"))
    await publisher.close(5)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    for _ in range(100):
        if CONSUMER_FAILURES._value.get() >= 1:
            break
        await asyncio.sleep(0.05)
    failures = CONSUMER_FAILURES._value.get()
    assert failures >= 1 and not task.done()
    await client.delete(tenant_scope("tenant-a"))  # repaired: the retry goes through
    for _ in range(100):
        if (await client.xpending("usage", "billing"))["pending"] == 0 and await reservations.scope("tenant-a"):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    assert [e.request_id for e in ledger.entries("tenant-a")] == ["r1"]
    assert (await reservations.scope("tenant-a"))["spent"] == ledger.entries("tenant-a")[0].cost_micros
    assert (await client.xpending("usage", "billing"))["pending"] == 0
    await client.aclose()


async def test_the_consumer_stops_when_asked_while_redis_is_gone(tmp_path: Path) -> None:
    port = free_port()
    args = ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(tmp_path)]
    server = await asyncio.create_subprocess_exec("redis-server", *args, stdout=subprocess.DEVNULL)
    await asyncio.to_thread(wait_until, port_open(port), "redis", time.monotonic() + 10)
    client = redis_client(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    consumer = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.sleep(0.3)
    server.kill()  # gone for good, as when the whole platform stops
    await server.wait()
    await asyncio.sleep(1.5)  # the consumer retries meanwhile
    stop.set()
    await asyncio.wait_for(task, 5)
    await client.aclose()


async def test_acknowledged_usage_is_trimmed_from_the_stream_and_nothing_else(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    consumer = UsageConsumer(
        client, Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}")), load_prices(), "usage", "billing", "c1"
    )
    await consumer.ensure_group()
    assert await consumer.watch_stream() == 0  # nothing read yet: nothing goes
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(30):
        publisher.publish(usage(f"r{i}"))
    await publisher.close(5)
    stop = asyncio.Event()
    stop.set()
    await consumer.run(stop)  # nothing pending to replay: returns at once
    # Another consumer reads 10 and "crashes" before acknowledging; 20 are never read.
    await client.xreadgroup("billing", "gone", {"usage": ">"}, count=10)
    assert await consumer.watch_stream() == 0
    unread = await client.xrange("usage")
    # Now the first 10 are applied and acknowledged (reclaimed from the gone consumer).
    claimed = await client.xautoclaim("usage", "billing", "c1", 0, start_id="0-0", count=10)
    await consumer.apply(claimed[1])
    assert await consumer.watch_stream() == 10
    assert await client.xrange("usage") == unread[10:]
    pending = await client.xpending("usage", "billing")
    assert pending["pending"] == 0
    await client.aclose()


async def test_unacknowledged_entries_are_applied_after_a_restart(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    consumer = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50)
    await consumer.ensure_group()
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    publisher.publish(usage("crash-1"))
    await publisher.close(5)
    # A consumer read the entry, then "crashed" before recording or acking it.
    await client.xreadgroup("billing", "c1", {"usage": ">"}, count=10)
    assert ledger.entries("tenant-a") == []
    stop = asyncio.Event()
    stop.set()  # drain the pending entries, then stop
    await consumer.run(stop)
    assert [e.request_id for e in ledger.entries("tenant-a")] == ["crash-1"]
    await client.aclose()


async def test_entries_of_a_consumer_that_never_returns_are_reclaimed(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    survivor = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "survivor", reclaim_idle_ms=0)
    await survivor.ensure_group()
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(5):
        publisher.publish(usage(f"orphan-{i}"))
    await publisher.close(5)
    await client.xreadgroup("billing", "crashed-replica", {"usage": ">"}, count=10)  # read, never acked
    assert await survivor.reclaim() == 5
    assert sorted(e.request_id for e in ledger.entries("tenant-a")) == [f"orphan-{i}" for i in range(5)]
    assert (await client.xpending("usage", "billing"))["pending"] == 0
    await client.aclose()


async def test_crossing_a_soft_budget_emits_one_alert(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    ledger.set_budget("tenant-a", hard_limit_micros=0, soft_limit_micros=15)
    consumer = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "c1", alerts_stream="alerts")
    await consumer.ensure_group()
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(4):  # 10 prompt + 3 completion tokens at the default price: 16 micro-units each
        publisher.publish(usage(f"spend-{i}"))
    await publisher.close(5)
    while pending := await client.xreadgroup("billing", "c1", {"usage": ">"}, count=1):
        await consumer.apply(list(pending[0][1]))
    alerts = await client.xrange("alerts")
    assert len(alerts) == 1
    fields = alerts[0][1]
    assert fields[b"tenant_id"] == b"tenant-a" and fields[b"kind"] == b"soft_budget"
    assert int(fields[b"spent_micros"]) >= 15
    await client.aclose()
