"""Consumes the usage stream with a consumer group. An entry is acknowledged
only after the transaction that records it commits, so a crash between the two
redelivers it, and the ledger's primary key makes the redelivery harmless.
An entry that cannot be decoded goes to a dead-letter stream with the reason."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis
import structlog

from services.billing.events import decode
from services.billing.ledger import Entry, Ledger

log = structlog.get_logger()

DEAD_LETTER_SUFFIX = ":dead"


def to_entry(fields: dict[bytes, bytes]) -> Entry:
    e = decode(fields)
    return Entry(e.request_id, e.tenant_id, e.key_id, e.model, e.prompt_tokens,
                 e.completion_tokens, e.finish_reason, e.completed_at)


class UsageConsumer:
    def __init__(self, client: redis.Redis, ledger: Ledger, stream: str, group: str, name: str,
                 batch: int = 200, block_ms: int = 1000) -> None:
        self._redis = client
        self._ledger = ledger
        self._stream = stream
        self._group = group
        self._name = name
        self._batch = batch
        self._block_ms = block_ms

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def apply(self, messages: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        entries, ids, dead = [], [], []
        for message_id, fields in messages:
            ids.append(message_id)
            try:
                entries.append(to_entry(fields))
            except ValueError as exc:
                dead.append((message_id, fields, str(exc)))
        for message_id, fields, reason in dead:
            await self._redis.xadd(
                self._stream + DEAD_LETTER_SUFFIX,
                {**fields, b"reason": reason.encode(), b"source_id": message_id},
            )
            log.warning("usage event dead-lettered", message_id=message_id.decode(), reason=reason)
        applied = await asyncio.to_thread(self._ledger.record, entries) if entries else 0
        await self._redis.xack(self._stream, self._group, *ids)
        return applied

    async def _read(self, start_id: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = await self._redis.xreadgroup(
            self._group, self._name, {self._stream: start_id}, count=self._batch, block=self._block_ms
        )
        return list(reply[0][1]) if reply else []

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_group()
        # First what this consumer read but did not acknowledge before a crash.
        while pending := await self._read("0"):
            await self.apply(pending)
        while not stop.is_set():
            try:
                messages = await self._read(">")
                if messages:
                    applied = await self.apply(messages)
                    log.info("usage applied", received=len(messages), new=applied)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                log.warning("redis unavailable; retrying", error=str(exc))
                await asyncio.sleep(1)
