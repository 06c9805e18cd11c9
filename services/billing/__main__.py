"""Billing service entry point: the ledger, the usage consumer and the gRPC
server run side by side; SIGTERM stops both."""

import asyncio
import contextlib

from mariana_common.logs import start_telemetry
from mariana_common.redis_client import redis_client
from mariana_common.server import create_server, run, serve
from mariana_common.sql import Database, database_url
from services.billing.consumer import UsageConsumer
from services.billing.events import UsageStreamSettings
from services.billing.ledger import Ledger
from services.billing.prices import load_prices
from services.billing.reservations import Reservations
from services.billing.servicer import SERVICE_NAME, register
from services.billing.settings import BillingSettings


async def main() -> None:
    settings = BillingSettings()  # type: ignore[call-arg]
    stream = UsageStreamSettings()
    start_telemetry("billing", settings)
    ledger = Ledger(Database(database_url(settings.database)))
    client = redis_client(stream.redis_url, timeout_s=5.0)
    reservations = Reservations(client)
    consumer = UsageConsumer(
        client,
        ledger,
        load_prices(settings.prices_file),
        stream.usage_stream,
        settings.consumer_group,
        settings.consumer_name,
        reclaim_idle_ms=settings.reclaim_idle_ms,
        alerts_stream=settings.alerts_stream,
        linger_s=settings.consumer_linger_s,
        reservations=reservations,
    )
    stop = asyncio.Event()
    consuming = asyncio.create_task(consumer.run(stop))
    server = create_server(settings, register(ledger, reservations), [SERVICE_NAME])
    try:
        await serve(server, settings)
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(consuming, timeout=settings.shutdown_grace_s)
        await client.aclose()
        ledger.close()


if __name__ == "__main__":
    run(main)
