"""Consumes the usage stream with a consumer group. An entry is acknowledged
only after the transaction that records it commits, so a crash between the two
redelivers it, and the ledger's primary key makes the redelivery harmless.
An entry that cannot be decoded goes to a dead-letter stream with the reason."""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as redis
import structlog
from opentelemetry import trace
from prometheus_client import Counter, Gauge

from mariana_common.sql import IntegrityError
from mariana_common.tracing import links_to, tracing_enabled
from services.billing.events import decode
from services.billing.ledger import Entry, Ledger
from services.billing.prices import PriceCatalog
from services.billing.reservations import Reservations

log = structlog.get_logger()
TRACER = trace.get_tracer("mariana.billing")

APPLIED = Counter("mariana_billing_events_applied_total", "Usage events that became ledger entries.")
CONSUMER_FAILURES = Counter("mariana_billing_consumer_failures_total", "Batches that failed and will be retried.")
DEAD_LETTERS = Counter("mariana_billing_dead_letters_total", "Usage events that could not be applied.")
LAG = Gauge("mariana_billing_consumer_lag_events", "Usage events published but not yet applied (lag + pending).")

DEAD_LETTER_SUFFIX = ":dead"


def _stream_id(raw: bytes | str) -> tuple[int, int]:
    ms, _, seq = (raw.decode() if isinstance(raw, bytes) else raw).partition("-")
    return int(ms), int(seq or 0)


def to_entry(fields: dict[bytes, bytes], prices: PriceCatalog) -> Entry:
    e = decode(fields)
    price = prices.price(e.model, e.completed_at)
    cost = price.cost_micros(e.prompt_tokens, e.completion_tokens, e.cached_prompt_tokens)
    return Entry(
        e.request_id,
        e.tenant_id,
        e.key_id,
        e.model,
        e.prompt_tokens,
        e.completion_tokens,
        e.finish_reason,
        e.completed_at,
        cost,
    )


class UsageConsumer:
    def __init__(
        self,
        client: redis.Redis,
        ledger: Ledger,
        prices: PriceCatalog,
        stream: str,
        group: str,
        name: str,
        batch: int = 200,
        block_ms: int = 1000,
        reclaim_idle_ms: int = 30_000,
        alerts_stream: str = "mariana:alerts",
        linger_s: float = 0.0,
        reservations: Reservations | None = None,
        reap_interval_s: float = 5.0,
    ) -> None:
        self._redis = client
        self._ledger = ledger
        self._prices = prices
        self._stream = stream
        self._group = group
        self._name = name
        self._batch = batch
        self._block_ms = block_ms
        self._reclaim_idle_ms = reclaim_idle_ms
        self._alerts_stream = alerts_stream
        # After a batch that was not full, wait this long so the next one is
        # bigger: one transaction per batch, so fewer and larger batches cost
        # less CPU per event, for at most this much more ledger lag.
        self._linger_s = linger_s
        # The admission state the routers reserve against: spend applied here,
        # reservations released when their row commits or their lease ends.
        self._reservations = reservations
        self._reap_interval_s = reap_interval_s

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self._stream, self._group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _dead_letter(self, message_id: bytes, fields: dict[bytes, bytes], reason: str) -> None:
        await self._redis.xadd(
            self._stream + DEAD_LETTER_SUFFIX,
            {**fields, b"reason": reason.encode(), b"source_id": message_id},  # type: ignore[dict-item]
        )
        DEAD_LETTERS.inc()
        log.warning("usage event dead-lettered", message_id=message_id.decode(), reason=reason)

    async def _record(self, batch: list[tuple[bytes, dict[bytes, bytes], Entry]]) -> list[Entry]:
        try:
            return await asyncio.to_thread(self._ledger.record_new, [entry for _, _, entry in batch])
        except IntegrityError:
            if len(batch) == 1:
                message_id, fields, _ = batch[0]
                await self._dead_letter(message_id, fields, "rejected by the ledger's constraints")
                return []
        # One bad entry must not block the rest: apply them one by one.
        return [entry for item in batch for entry in await self._record([item])]

    async def _admit_spend(self, entries: list[Entry]) -> None:
        """The new rows' cost counts against budgets in Redis, and their
        reservations end. Only new rows: a redelivered event changes nothing."""
        if self._reservations is None:
            return
        await self._reservations.apply_many([(e.request_id, e.tenant_id, e.key_id, e.cost_micros) for e in entries])

    async def apply(self, messages: list[tuple[bytes, dict[bytes, bytes]]]) -> int:
        """Records a batch, then acknowledges it; returns how many entries were new.
        Traced as one span linked to each event's request span (the stream
        breaks the parent chain; links keep the trace whole)."""
        decoded = []
        for message_id, fields in messages:
            try:
                decoded.append((message_id, fields, to_entry(fields, self._prices)))
            except ValueError as exc:
                await self._dead_letter(message_id, fields, str(exc))
        links = links_to([decode(fields).traceparent for _, fields, _ in decoded]) if tracing_enabled() else []
        with TRACER.start_as_current_span("billing.apply_usage", links=links) as span:
            new = await self._record(decoded) if decoded else []
            span.set_attribute("mariana.events", len(messages))
            span.set_attribute("mariana.new_entries", len(new))
            if new:
                await self._admit_spend(new)
                await self._alert({(e.tenant_id, s) for _, _, e in decoded for s in ("", e.key_id)})
            await self._redis.xack(self._stream, self._group, *[message_id for message_id, _ in messages])
        return len(new)

    async def sync_admission_state(self) -> None:
        """Sets the Redis spend and hard limits from the ledger (at start: a
        crash between a commit and its Redis update leaves nothing behind)."""
        if self._reservations is None:
            return
        for tenant_id, key_id, spent in await asyncio.to_thread(self._ledger.spend_by_scope):
            await self._reservations.set_spent(tenant_id, key_id, spent)
        for tenant_id, key_id, hard in await asyncio.to_thread(self._ledger.hard_limits):
            await self._reservations.set_hard_limit(tenant_id, key_id, hard)

    async def watch_stream(self) -> int:
        """Measures the lag (entries not yet read by the group plus those read
        and not acknowledged) and deletes the entries every consumer group has
        acknowledged: the stream would otherwise keep every usage event, in
        Redis's memory, forever. Entries not yet read, or read and not
        acknowledged, stay. Returns how many went."""
        groups: Any = await self._redis.xinfo_groups(self._stream)
        floors = []
        for group in groups:
            pending = int(group.get("pending") or 0)
            if group.get("name") in (self._group, self._group.encode()):
                LAG.set(int(group.get("lag") or 0) + pending)
            if pending:
                summary: Any = await self._redis.xpending(self._stream, group["name"])
                floors.append(_stream_id(summary["min"]))  # its oldest unacknowledged entry
            else:
                ms, seq = _stream_id(group["last-delivered-id"])
                floors.append((ms, seq + 1))  # everything it was given is acknowledged
        if not floors:
            return 0
        ms, seq = min(floors)
        return int(await self._redis.xtrim(self._stream, minid=f"{ms}-{seq}", approximate=False))

    async def reap(self) -> list[str]:
        """Releases reservations whose lease ended (their request died with its
        replica, or its usage is late and will count when it comes)."""
        if self._reservations is None:
            return []
        released = await self._reservations.release_expired()
        if released:
            log.warning("reservations released at lease end", count=len(released))
        return released

    async def _alert(self, scopes: set[tuple[str, str]]) -> None:
        """A soft budget just crossed becomes one event on the alerts stream."""
        for tenant_id, key_id, limits in await asyncio.to_thread(self._ledger.soft_alerts_due, scopes):
            await self._redis.xadd(
                self._alerts_stream,
                {
                    "kind": "soft_budget",
                    "tenant_id": tenant_id,
                    "key_id": key_id,
                    "spent_micros": limits.spent_micros,
                    "soft_limit_micros": limits.soft_limit_micros,
                },
            )
            log.warning("soft budget crossed", tenant_id=tenant_id, key_id=key_id, spent=limits.spent_micros)

    async def _read(self, start_id: str) -> list[tuple[bytes, dict[bytes, bytes]]]:
        reply: Any = await self._redis.xreadgroup(
            self._group, self._name, {self._stream: start_id}, count=self._batch, block=self._block_ms
        )
        return list(reply[0][1]) if reply else []

    async def reclaim(self) -> int:
        """Takes over entries another consumer read but has not acknowledged for
        `reclaim_idle_ms` (it crashed and did not come back) and applies them."""
        claimed, start = 0, "0-0"
        while True:
            reply: Any = await self._redis.xautoclaim(
                self._stream, self._group, self._name, self._reclaim_idle_ms, start_id=start, count=self._batch
            )
            start, messages = reply[0], [m for m in reply[1] if m[1] is not None]
            if messages:
                await self.apply(messages)
                claimed += len(messages)
            if start in (b"0-0", "0-0"):
                return claimed

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_group()
        await self.sync_admission_state()
        await self.reclaim()
        loop = asyncio.get_running_loop()
        next_reclaim = loop.time() + self._reclaim_idle_ms / 1000
        next_reap = loop.time() + self._reap_interval_s
        next_lag = loop.time()
        # First what this consumer read but did not acknowledge (before a
        # crash, or a batch that failed), then new messages.
        replay, resync = True, False
        while True:
            try:
                if resync:  # a batch may have committed to the ledger and not reached Redis
                    await self.sync_admission_state()
                    resync = False
                while replay and (pending := await self._read("0")):
                    await self.apply(pending)
                replay = False
                if stop.is_set():
                    return
                messages = await self._read(">")
                if messages:
                    applied = await self.apply(messages)
                    APPLIED.inc(applied)
                    log.debug("usage applied", received=len(messages), new=applied)
                    if len(messages) < self._batch and self._linger_s:
                        await asyncio.sleep(self._linger_s)
                if loop.time() >= next_lag:
                    next_lag = loop.time() + 1.0
                    await self.watch_stream()
                if loop.time() >= next_reap:
                    next_reap = loop.time() + self._reap_interval_s
                    await self.reap()
                if loop.time() >= next_reclaim:
                    next_reclaim = loop.time() + self._reclaim_idle_ms / 1000
                    if claimed := await self.reclaim():
                        log.warning("reclaimed usage left by a gone consumer", entries=claimed)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if stop.is_set():  # what is pending stays pending, for the next start
                    return
                log.warning("redis unavailable; retrying", error=str(exc))
                replay = True
                await asyncio.sleep(1)
            except Exception:  # the consumer must outlive any one batch
                # What was read and not acknowledged stays pending and is read
                # again, so nothing is lost; a consumer task that died would
                # silently stop all billing.
                log.exception("applying usage failed; retrying what is pending")
                CONSUMER_FAILURES.inc()
                if stop.is_set():
                    return
                replay = resync = True
                await asyncio.sleep(1)
