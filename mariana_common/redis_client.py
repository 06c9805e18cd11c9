"""The Redis client every service uses: a blocking pool, so a burst of
concurrent requests waits briefly for a connection instead of failing with
"too many connections" (the default pool raises past 100)."""

from __future__ import annotations

import redis.asyncio as redis


def redis_client(url: str, timeout_s: float = 1.0, max_connections: int = 64) -> redis.Redis:
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
    )
    return redis.Redis(connection_pool=pool)
