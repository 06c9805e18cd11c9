"""Requests-per-minute and tokens-per-minute limits as token buckets in Redis,
shared by every auth and router replica.

Admission (auth, on every request) checks every bucket that applies — the
key's and the tenant's RPM and TPM — in one Lua script, so a request takes from
all of them or from none; a key sending many requests takes several request
tokens at once (a lease, below), and within a lease the TPM buckets are as the
last take saw them (≤ 0.1 s old; the router's reservation is the exact gate).
A bucket holds up to a minute's allowance and refills continuously, so a
burst admits exactly the limit. Auth only checks that a token bucket is not
empty (it cannot see the request body); the router then
reserves the request's worst-case tokens from the same buckets and gives back
what was not used (`services/billing/reservations.py`), so admitted tokens
never pass the limit. Redis's clock is used, so replicas agree."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as redis

# KEYS: buckets. ARGV: per bucket capacity, refill per ms, cost.
# Returns {allowed, retry_after_ms, level_1, ..., level_n}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local levels, wait = {}, 0
for i = 1, #KEYS do
  local cap, rate, cost = tonumber(ARGV[i*3-2]), tonumber(ARGV[i*3-1]), tonumber(ARGV[i*3])
  local state = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(state[1]) or cap
  local ts = tonumber(state[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
  levels[i] = tokens
  local need = math.max(cost, 1)
  if tokens < need then
    wait = math.max(wait, (need - tokens) / rate)
  end
end
if wait > 0 then
  local out = {0, math.ceil(wait)}
  for i = 1, #KEYS do out[#out + 1] = math.floor(levels[i]) end
  return out
end
local out = {1, 0}
for i = 1, #KEYS do
  local cap, rate, cost = tonumber(ARGV[i*3-2]), tonumber(ARGV[i*3-1]), tonumber(ARGV[i*3])
  local tokens = levels[i] - cost
  redis.call('HSET', KEYS[i], 'tokens', tostring(tokens), 'ts', now, 'cap', cap, 'rate', tostring(rate))
  redis.call('PEXPIRE', KEYS[i], math.ceil(cap / rate) + 60000)
  out[#out + 1] = math.floor(tokens)
end
return out
"""

MINUTE_MS = 60_000


def request_bucket(scope: str, owner: str) -> str:
    return f"mariana:rl:{scope}:{owner}:rpm"


def token_bucket(scope: str, owner: str) -> str:
    return f"mariana:rl:{scope}:{owner}:tpm"


@dataclass(frozen=True)
class Limit:
    bucket: str
    per_minute: int
    cost: int
    kind: str  # "requests" or "tokens"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float = 0.0
    # OpenAI's x-ratelimit-* headers, for the tightest limit of each kind.
    headers: dict[str, str] = field(default_factory=dict)
    exceeded: str = ""  # "requests" or "tokens" when refused


def limits_for(
    key_id: str,
    tenant_id: str,
    key_rpm: int | None,
    key_tpm: int | None,
    tenant_rpm: int | None,
    tenant_tpm: int | None,
) -> list[Limit]:
    candidates = [
        (request_bucket("key", key_id), key_rpm, 1, "requests"),
        (request_bucket("tenant", tenant_id), tenant_rpm, 1, "requests"),
        (token_bucket("key", key_id), key_tpm, 0, "tokens"),
        (token_bucket("tenant", tenant_id), tenant_tpm, 0, "tokens"),
    ]
    return [Limit(bucket, per_minute, cost, kind) for bucket, per_minute, cost, kind in candidates if per_minute]


def _headers(limits: list[Limit], levels: list[int]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for kind in ("requests", "tokens"):
        pairs = [(limit, level) for limit, level in zip(limits, levels, strict=True) if limit.kind == kind]
        if not pairs:
            continue
        limit, level = min(pairs, key=lambda p: p[1])
        remaining = max(0, level)
        reset_s = (limit.per_minute - remaining) * 60 / limit.per_minute
        headers[f"x-ratelimit-limit-{kind}"] = str(limit.per_minute)
        headers[f"x-ratelimit-remaining-{kind}"] = str(remaining)
        headers[f"x-ratelimit-reset-{kind}"] = f"{reset_s:.3f}s"
    return headers


# A key sending many requests takes its request tokens from Redis a few at a
# time (a lease, held here for at most LEASE_S): one round trip for many
# requests. Leases never admit more than the limit (the tokens are taken
# first); what a lease leaves unused when it ends is lost, so a lease is at
# most 1% of the key's per-minute limit (a limit under 200 is never leased).
LEASE_S = 0.1
MAX_LEASE = 64


@dataclass
class _Lease:
    size: int  # request tokens the next lease takes
    left: int = 0  # taken from Redis, not yet handed out
    expires: float = 0.0
    levels: list[int] = field(default_factory=list)  # as Redis reported them at the last take


def lease_cap(limits: list[Limit]) -> int:
    per_minute = min((limit.per_minute for limit in limits if limit.kind == "requests"), default=0)
    return max(1, min(MAX_LEASE, per_minute // 100))


class RateLimiter:
    def __init__(self, client: redis.Redis, clock: Callable[[], float] = time.monotonic) -> None:
        self._admit = client.register_script(ADMIT)
        self._clock = clock
        self._leases: dict[tuple[str, ...], _Lease] = {}

    async def admit(self, limits: list[Limit]) -> Decision:
        if not limits:
            return Decision(True)
        now = self._clock()
        key = tuple(limit.bucket for limit in limits)
        lease = self._leases.get(key)
        if lease is not None and lease.left > 0 and now < lease.expires:
            lease.left -= 1
            return Decision(True, headers=_headers(limits, _with_lease(limits, lease.levels, lease.left)))
        if lease is None:
            if len(self._leases) >= 10_000:
                self._forget_ended(now)
            lease = self._leases[key] = _Lease(size=1)
        elif lease.left == 0 and now < lease.expires:  # used up in time: take more next
            lease.size *= 2
        elif lease.left > 0:  # ended with tokens left: take fewer
            lease.size = max(1, lease.size // 2)
        lease.size = size = min(lease.size, lease_cap(limits))
        decision, levels = await self._take(limits, size)
        if not decision.allowed and size > 1:  # the last few tokens are handed out one at a time
            lease.size = size = 1
            decision, levels = await self._take(limits, size)
        if decision.allowed:
            left = lease.left if now < lease.expires else 0
            lease.left, lease.expires, lease.levels = left + size - 1, now + LEASE_S, levels
            return Decision(True, headers=_headers(limits, _with_lease(limits, levels, lease.left)))
        return decision

    async def _take(self, limits: list[Limit], requests: int) -> tuple[Decision, list[int]]:
        """`requests` tokens from every request bucket (a token bucket's cost stays 0)."""
        args: list[float] = []
        for limit in limits:
            cost = requests if limit.kind == "requests" else limit.cost
            args += [limit.per_minute, limit.per_minute / MINUTE_MS, cost]
        reply = await self._admit(keys=[limit.bucket for limit in limits], args=args)
        allowed, wait_ms, *levels = (int(v) for v in reply)
        headers = _headers(limits, levels)
        if allowed:
            return Decision(True, headers=headers), levels
        short = [limit.kind for limit, level in zip(limits, levels, strict=True) if level < max(limit.cost, 1)]
        return Decision(False, math.ceil(wait_ms / 1000), headers, short[0] if short else "requests"), levels

    def _forget_ended(self, now: float) -> None:
        for key in [k for k, lease in self._leases.items() if now >= lease.expires]:
            del self._leases[key]


def _with_lease(limits: list[Limit], levels: list[int], left: int) -> list[int]:
    """The levels a client is told: tokens this replica holds count as remaining."""
    return [level + left if limit.kind == "requests" else level for limit, level in zip(limits, levels, strict=True)]


def token_buckets(key_id: str, tenant_id: str) -> list[str]:
    """The key's and tenant's tokens-per-minute buckets (the router reserves
    from them; those a key has no limit for do not exist and are skipped)."""
    return [token_bucket("key", key_id), token_bucket("tenant", tenant_id)]
