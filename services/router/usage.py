"""Publishes usage records to the Redis Stream billing consumes and settles
their reservations, off the request path: `publish` and `release` queue, a
background task sends in batches, and spools to disk while Redis is away."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as redis
import structlog
from redis.exceptions import NoScriptError, RedisError

from mariana.billing.v1.billing_pb2 import UsageEvent
from services.billing.events import encode
from services.billing.reservations import Reservations
from services.router.domain import UsageRecord
from services.router.spool import Item, Spool

log = structlog.get_logger()


def to_event(r: UsageRecord) -> UsageEvent:
    return UsageEvent(
        request_id=r.request_id,
        tenant_id=r.tenant_id,
        key_id=r.key_id,
        model=r.model,
        prompt_tokens=r.prompt_tokens,
        completion_tokens=r.completion_tokens,
        finish_reason=r.finish_reason,
        completed_at=r.completed_at,
        traceparent=r.traceparent,
    )


class RedisUsagePublisher:
    """Usage events to the stream and reservation settles, in batches, off the
    request path. When Redis cannot be reached, batches go to the durable
    spool (in order) and are replayed from it, oldest first, once Redis is back;
    while the spool holds anything, new batches queue behind it."""

    def __init__(
        self,
        client: redis.Redis,
        stream: str,
        reservations: Reservations,
        spool: Spool,
        retry_s: float = 1.0,
        linger_s: float = 0.025,
    ) -> None:
        self._redis = client
        self._stream = stream
        self._reservations = reservations
        self._spool = spool
        self._retry_s = retry_s
        # A batch waits this long after its first item for others: one round
        # trip (and one pipeline's overhead) for several requests under load.
        self._linger_s = linger_s
        self._queue: asyncio.Queue[Item] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    @property
    def spool_depth(self) -> int:
        return self._spool.depth

    def start(self) -> None:
        self._task = asyncio.create_task(self._send_forever())

    def publish(self, record: UsageRecord) -> None:
        self._queue.put_nowait(record)

    def release(self, request_id: str) -> None:
        self._queue.put_nowait(request_id)

    async def _send_batch(self, batch: list[Item]) -> None:
        """One round trip: each record to the stream with its settle, each
        release as a settle to nothing. The settle script goes by its hash (a
        pipeline given the script object would first ask Redis whether it has
        it: a second round trip per batch); if Redis has lost it, it is loaded
        and only the settles are sent again."""
        settles: list[tuple[str, int, int]] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            for item in batch:
                if isinstance(item, str):
                    settles.append((item, 0, 0))
                    continue
                pipe.xadd(self._stream, encode(to_event(item)))  # type: ignore[arg-type]
                if item.settle_micros is not None:
                    settles.append((item.request_id, item.settle_micros, item.prompt_tokens + item.completion_tokens))
            for request_id, micros, tokens in settles:
                self._reservations.settle_into(pipe, request_id, micros, tokens)
            results = await pipe.execute(raise_on_error=False)
        failures = [r for r in results if isinstance(r, Exception)]
        if not failures:
            return
        if not all(isinstance(f, NoScriptError) for f in failures):
            raise failures[0]
        # Only settles can fail this way, and then all of them did.
        await self._reservations.load_scripts()
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, micros, tokens in settles:
                self._reservations.settle_into(pipe, request_id, micros, tokens)
            await pipe.execute()

    async def _replay(self) -> None:
        """Sends what the spool holds, oldest first, then empties it."""
        items = self._spool.read()
        for start in range(0, len(items), 500):
            await self._send_batch(items[start : start + 500])
        self._spool.clear()
        if items:
            log.info("usage spool replayed", items=len(items))

    async def _send_forever(self) -> None:
        while True:
            if self._spool.depth:
                try:
                    await self._replay()
                except (RedisError, OSError) as exc:
                    log.warning("redis still unreachable; usage stays spooled", error=str(exc), depth=self._spool.depth)
                    await asyncio.sleep(self._retry_s)
                    self._spool_queued()
                    continue
            batch = [await self._queue.get()]
            if self._linger_s:
                await asyncio.sleep(self._linger_s)
            while not self._queue.empty() and len(batch) < 500:
                batch.append(self._queue.get_nowait())
            try:
                await self._send_batch(batch)
            except (RedisError, OSError) as exc:
                self._spool.append(batch)
                log.warning("redis unreachable; usage spooled to disk", error=str(exc), depth=self._spool.depth)
            for _ in batch:
                self._queue.task_done()

    def _spool_queued(self) -> None:
        """While the spool is not empty, what is queued goes behind it, in order."""
        batch: list[Item] = []
        while not self._queue.empty():
            batch.append(self._queue.get_nowait())
        if batch:
            self._spool.append(batch)
            log.warning("usage spooled to disk", depth=self._spool.depth)
            for _ in batch:
                self._queue.task_done()

    async def close(self, timeout_s: float) -> None:
        """Sends (or spools) what is queued, within `timeout_s`, then stops."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            pending: list[Item] = []
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            self._spool.append(pending)
            log.error("usage not delivered at shutdown; spooled", spooled=len(pending))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
