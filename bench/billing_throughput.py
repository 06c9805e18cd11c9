"""Usage events applied per second by the billing consumer (in-process, real
Redis Stream, priced and recorded in batches) on SQLite and on PostgreSQL.

    .venv/bin/python -m bench.billing_throughput [--events 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import redis
import redis.asyncio as aioredis

from bench.billing_crash import GROUP, STREAM, events, publish
from launcher.postgres import create_database, postgres_server
from launcher.processes import ManagedProcess
from launcher.readiness import port_open, wait_until
from mariana_common.logs import configure_logging
from mariana_common.sql import Database
from mesh.plan import free_port
from services.billing.consumer import UsageConsumer
from services.billing.ledger import Ledger
from services.billing.prices import load_prices


async def consume(redis_url: str, ledger: Ledger, total: int) -> float:
    client = aioredis.Redis.from_url(redis_url)
    consumer = UsageConsumer(client, ledger, load_prices(), STREAM, GROUP, "bench", block_ms=50)
    await consumer.ensure_group()
    stop = asyncio.Event()
    started = time.perf_counter()
    task = asyncio.create_task(consumer.run(stop))
    while True:  # done when every entry was read and acknowledged (so recorded)
        (group,) = await client.xinfo_groups(STREAM)
        if group["lag"] == 0 and group["pending"] == 0 and group["entries-read"] >= total:
            break
        await asyncio.sleep(0.02)
    elapsed = time.perf_counter() - started
    stop.set()
    await task
    await client.aclose()
    return elapsed


def main() -> None:
    configure_logging("bench", "warning")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mariana-billing-throughput-"))
    port = free_port()
    server = ManagedProcess(
        "redis",
        ["redis-server", "--port", str(port), "--save", "", "--dir", str(work)],
        dict(os.environ),
        work / "redis.log",
        work,
    )
    server.start()
    try:
        wait_until(port_open(port), "redis", time.monotonic() + 10, server)
        redis_url = f"redis://127.0.0.1:{port}/0"
        batch = events(args.events, random.Random(1))
        with postgres_server() as pg:
            for name, url in (("SQLite", f"sqlite:///{work / 'ledger.db'}"), ("PostgreSQL", create_database(pg, "b"))):
                redis.Redis.from_url(redis_url).flushall()
                publish(redis.Redis.from_url(redis_url), batch)
                elapsed = asyncio.run(consume(redis_url, Ledger(Database(url)), args.events))
                rate = args.events / elapsed
                print(f"{name:10s}: {args.events} events applied in {elapsed:.2f} s = {rate:,.0f} events/s", flush=True)
    finally:
        server.stop(5)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
