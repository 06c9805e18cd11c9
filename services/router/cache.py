"""Cache-aside for deterministic requests (temperature 0 or a fixed seed): an
exact-match answer cache in Redis, keyed on the tenant and the normalized
request, so tenants never share entries. An entry is fresh for `ttl_s`, then
kept `stale_s` longer for when nothing can serve. Size is bounded per entry
and in count (oldest evicted first). Redis trouble never fails a request: the
cache is skipped and the error counted."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import redis.asyncio as redis
import structlog

from mariana_common.outage import OutageGate
from services.router.catalog import CacheConfig
from services.router.domain import GenerationRequest
from services.router.metrics import CACHE_LOOKUPS

log = structlog.get_logger()

PREFIX = "mariana:cache:"
INDEX = "mariana:cache:index"


@dataclass(frozen=True)
class CachedAnswer:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    stored_at: float = 0.0  # set by ResponseCache.put


@dataclass(frozen=True)
class Lookup:
    answer: CachedAnswer
    fresh: bool


@dataclass
class CacheCounters:
    hits: int = 0
    stale_hits: int = 0
    misses: int = 0
    stores: int = 0
    errors: int = 0

    def count(self, result: str) -> None:
        setattr(self, result, getattr(self, result) + 1)
        CACHE_LOOKUPS.labels(result).inc()


def cache_key(tenant_id: str, model: str, request: GenerationRequest, n: int) -> str | None:
    """None when the request is not cacheable: sampled without a seed, several
    choices, or logprobs asked for."""
    s = request.sampling
    if n != 1 or s.logprobs or (s.temperature > 0 and s.seed is None):
        return None
    material = {
        "tenant": tenant_id,
        "model": model,
        "messages": [list(m) for m in request.messages] if request.messages is not None else None,
        "prompt": request.prompt if request.messages is None else None,
        "sampling": {**asdict(s), "stop": list(s.stop)},
    }
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return f"{PREFIX}{tenant_id}:{digest}"


class ResponseCache:
    def __init__(
        self, client: redis.Redis, config: Callable[[], CacheConfig], clock: Callable[[], float] = time.time
    ) -> None:
        self._redis = client
        self._config = config
        self._clock = clock
        self.counters = CacheCounters()
        self._gate = OutageGate(hold_s=1.0)

    def key_for(self, tenant_id: str, model: str, request: GenerationRequest, n: int) -> str | None:
        config = self._config()
        if not config.enabled or tenant_id in config.exclude_tenants:
            return None
        return cache_key(tenant_id, model, request, n)

    async def get(self, key: str) -> Lookup | None:
        if self._gate.is_down():  # failed a moment ago: do not wait for another timeout
            self.counters.count("errors")
            return None
        try:
            raw = await self._redis.get(key)
        except (redis.RedisError, OSError) as error:
            self.counters.count("errors")
            self._gate.failed()
            log.warning("cache unavailable; serving without it", error=str(error))
            return None
        self._gate.succeeded()
        if raw is None:
            self.counters.count("misses")
            return None
        try:
            answer = CachedAnswer(**json.loads(raw))
        except (ValueError, TypeError):
            self.counters.count("errors")
            return None
        fresh = self._clock() - answer.stored_at < self._config().ttl_s
        if fresh:
            self.counters.count("hits")
        else:
            self.counters.count("misses")  # kept only for when nothing can serve
        return Lookup(answer, fresh)

    def count_stale_hit(self) -> None:
        self.counters.count("stale_hits")

    async def put(self, key: str, answer: CachedAnswer) -> None:
        """Stores `answer`, stamped with this cache's clock."""
        if self._gate.is_down():
            return
        answer = replace(answer, stored_at=self._clock())
        config = self._config()
        value = json.dumps(asdict(answer))
        if len(value) > config.max_entry_bytes:
            return
        lifetime_ms = int((config.ttl_s + config.stale_s) * 1000)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.set(key, value, px=lifetime_ms)
                pipe.zadd(INDEX, {key: answer.stored_at})
                pipe.zcard(INDEX)
                *_, count = await pipe.execute()
            if count > config.max_entries:
                evicted: Any = await self._redis.zpopmin(INDEX, count - config.max_entries)
                if evicted:
                    await self._redis.delete(*[name for name, _ in evicted])
            self.counters.count("stores")
        except (redis.RedisError, OSError) as error:
            self.counters.count("errors")
            self._gate.failed()
            log.warning("cache store failed", error=str(error))
