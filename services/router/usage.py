"""Publishes usage records to the Redis Stream billing consumes, and charges
them to the tokens-per-minute buckets auth admits by, off the request path:
`publish` queues, a background task sends in batches."""

from __future__ import annotations

import asyncio
import contextlib

import redis.asyncio as redis
import structlog
from redis.exceptions import NoScriptError

from mariana.billing.v1.billing_pb2 import UsageEvent
from services.auth.rate_limit import DEBIT, token_buckets
from services.billing.events import encode
from services.router.domain import UsageRecord

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
    )


class RedisUsagePublisher:
    def __init__(self, client: redis.Redis, stream: str) -> None:
        self._redis = client
        self._stream = stream
        self._debit = client.register_script(DEBIT)
        self._queue: asyncio.Queue[UsageRecord] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._send_forever())

    def publish(self, record: UsageRecord) -> None:
        self._queue.put_nowait(record)

    async def _send_batch(self, batch: list[UsageRecord]) -> None:
        """One round trip: each record to the stream, and its tokens charged to
        the key's and tenant's tokens-per-minute buckets. The script goes by
        its hash (a pipeline given the script object would first ask Redis
        whether it has it: a second round trip per batch); if Redis has lost
        it, it is loaded and only the debits are sent again."""
        debits: list[tuple[list[str], int]] = []
        async with self._redis.pipeline(transaction=False) as pipe:
            for record in batch:
                pipe.xadd(self._stream, encode(to_event(record)))  # type: ignore[arg-type]
                tokens = record.prompt_tokens + record.completion_tokens
                if tokens:
                    keys = token_buckets(record.key_id, record.tenant_id)
                    pipe.evalsha(self._debit.sha, len(keys), *keys, tokens)
                    debits.append((keys, tokens))
            results = await pipe.execute(raise_on_error=False)
        failures = [r for r in results if isinstance(r, Exception)]
        if not failures:
            return
        if not all(isinstance(f, NoScriptError) for f in failures):
            raise failures[0]
        # Only debits can fail this way, and then all of them did.
        await self._redis.script_load(DEBIT)
        async with self._redis.pipeline(transaction=False) as pipe:
            for keys, tokens in debits:
                pipe.evalsha(self._debit.sha, len(keys), *keys, tokens)
            await pipe.execute()

    async def _send_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty() and len(batch) < 500:
                batch.append(self._queue.get_nowait())
            while True:
                try:
                    await self._send_batch(batch)
                    break
                except redis.RedisError as exc:
                    # Kept in memory and retried; a durable spool is future work.
                    log.warning("usage publish failed; retrying", error=str(exc), pending=len(batch))
                    await asyncio.sleep(1)
            for _ in batch:
                self._queue.task_done()

    async def close(self, timeout_s: float) -> None:
        """Sends what is queued (within `timeout_s`), then stops."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout_s)
        except TimeoutError:
            log.error("usage events not delivered at shutdown", pending=self._queue.qsize())
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
