"""Money and token admission that cannot be raced: reservations in Redis,
shared by every router replica and settled by billing.

State (one Redis; every change is one Lua script, so concurrent decisions are
serialized by Redis):
- `mariana:money:<tenant>` and `mariana:money:<tenant>:<key>` hashes: `hard`
  (the hard budget in micro-units, absent or 0 = none), `spent` (what the
  ledger has recorded), `reserved` (live reservations).
- `mariana:resv:<request id>`: one reservation (amount, tokens, the buckets it
  took tokens from, settled or not), and `mariana:resv:leases`, a sorted set of
  request ids by lease expiry.

Life of a request: the router RESERVEs its worst-case cost and tokens before
inference (refused when spent + reserved + amount would pass a hard budget, or
a tokens-per-minute bucket lacks the tokens); on completion, cancellation or
failure it SETTLEs to the real usage (the unused amount and tokens go back);
billing, after the ledger row commits, APPLYs it: spent grows by the ledger's
cost and the reservation is gone. A reservation whose request died with its
replica outlives its lease and is RELEASEd by billing's reaper. So spend never
passes a hard budget: a request is admitted only if its worst case fits.
Token buckets are auth's (cap and refill rate are stored in them at admission).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

LEASES = "mariana:resv:leases"

# KEYS: tenant scope, key scope, reservation, leases, then token buckets.
# ARGV: amount, tokens, lease ms, request id.
# Returns {1, 0, "ok", money left, tokens left} (after this reservation; -1:
# no hard budget, no bucket) | {0, retry_after_ms, "tenant"|"key"|"tokens"|"too_large"}.
# A retried reservation (it exists) returns {1, 0, "ok"}: what is left is not known.
RESERVE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[3]) == 1 then
  return {1, 0, 'ok'}
end
local amount, tokens, lease = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local money_left = -1
for i = 1, 2 do
  local s = redis.call('HMGET', KEYS[i], 'hard', 'spent', 'reserved')
  local hard = tonumber(s[1]) or 0
  if hard > 0 then
    local left = hard - (tonumber(s[2]) or 0) - (tonumber(s[3]) or 0) - amount
    if left < 0 then
      return {0, 0, i == 1 and 'tenant' or 'key'}
    end
    if money_left < 0 or left < money_left then
      money_left = left
    end
  end
end
local levels, wait, buckets, tokens_left = {}, 0, {}, -1
for j = 5, #KEYS do
  local b = redis.call('HMGET', KEYS[j], 'tokens', 'ts', 'cap', 'rate')
  if b[3] then
    local cap, rate = tonumber(b[3]), tonumber(b[4])
    if tokens > cap then
      return {0, 0, 'too_large'}
    end
    local level = math.min(cap, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate)
    levels[j] = level
    buckets[#buckets + 1] = KEYS[j]
    if level < tokens then
      wait = math.max(wait, math.ceil((tokens - level) / rate))
    end
  end
end
if wait > 0 then
  return {0, wait, 'tokens'}
end
for j = 5, #KEYS do
  if levels[j] then
    redis.call('HSET', KEYS[j], 'tokens', tostring(levels[j] - tokens), 'ts', now)
    local left = math.floor(levels[j] - tokens)
    if tokens_left < 0 or left < tokens_left then
      tokens_left = left
    end
  end
end
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
redis.call('HINCRBY', KEYS[2], 'reserved', amount)
redis.call('HSET', KEYS[3], 'amount', amount, 'tokens', tokens, 'settled', 0,
  'tenant_scope', KEYS[1], 'key_scope', KEYS[2], 'buckets', table.concat(buckets, ' '))
redis.call('PEXPIRE', KEYS[3], lease + 3600000)
redis.call('ZADD', KEYS[4], now + lease, ARGV[4])
return {1, 0, 'ok', money_left, tokens_left}
"""

# KEYS: reservation. ARGV: actual amount, actual tokens. Once per reservation:
# the amount shrinks (or grows) to the actual cost; unused tokens go back.
SETTLE = """
local r = redis.call('HMGET', KEYS[1], 'amount', 'tokens', 'settled', 'tenant_scope', 'key_scope', 'buckets')
if not r[1] or r[3] == '1' then
  return 0
end
local actual, used = tonumber(ARGV[1]), tonumber(ARGV[2])
local delta = actual - tonumber(r[1])
redis.call('HINCRBY', r[4], 'reserved', delta)
redis.call('HINCRBY', r[5], 'reserved', delta)
local refund = tonumber(r[2]) - used
if refund > 0 and r[6] ~= '' then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  for bucket in string.gmatch(r[6], '%S+') do
    local b = redis.call('HMGET', bucket, 'tokens', 'ts', 'cap', 'rate')
    if b[1] then
      local cap, rate = tonumber(b[3]), tonumber(b[4])
      local level = math.min(cap, tonumber(b[1]) + math.max(0, now - tonumber(b[2])) * rate + refund)
      redis.call('HSET', bucket, 'tokens', tostring(level), 'ts', now)
    end
  end
end
redis.call('HSET', KEYS[1], 'amount', actual, 'tokens', used, 'settled', 1)
return 1
"""

# KEYS: tenant scope, key scope, reservation, leases. ARGV: ledger cost, request id.
# Billing, once per new ledger row: the spend counts, the reservation is gone.
APPLY = """
redis.call('HINCRBY', KEYS[1], 'spent', ARGV[1])
redis.call('HINCRBY', KEYS[2], 'spent', ARGV[1])
local amount = redis.call('HGET', KEYS[3], 'amount')
if amount then
  -- 0 - x, not -x: Lua's -0 reaches Redis as "-0", which HINCRBY refuses
  redis.call('HINCRBY', KEYS[1], 'reserved', 0 - tonumber(amount))
  redis.call('HINCRBY', KEYS[2], 'reserved', 0 - tonumber(amount))
  redis.call('DEL', KEYS[3])
end
redis.call('ZREM', KEYS[4], ARGV[2])
return amount and 1 or 0
"""

# KEYS: leases. ARGV: now is Redis's; at most ARGV[1] reservations whose lease
# ran out are released (their request died with its replica, or its usage is
# late: then APPLY counts the spend when it comes). Returns the request ids.
RELEASE_EXPIRED = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, id in ipairs(ids) do
  local key = 'mariana:resv:' .. id
  local r = redis.call('HMGET', key, 'amount', 'tenant_scope', 'key_scope')
  if r[1] then
    redis.call('HINCRBY', r[2], 'reserved', 0 - tonumber(r[1]))
    redis.call('HINCRBY', r[3], 'reserved', 0 - tonumber(r[1]))
    redis.call('DEL', key)
  end
  redis.call('ZREM', KEYS[1], id)
end
return ids
"""


def tenant_scope(tenant_id: str) -> str:
    return f"mariana:money:{tenant_id}"


def key_scope(tenant_id: str, key_id: str) -> str:
    return f"mariana:money:{tenant_id}:{key_id}"


def reservation_key(request_id: str) -> str:
    return f"mariana:resv:{request_id}"


def scope_of(tenant_id: str, key_id: str) -> str:
    """The key's scope, or the tenant's when `key_id` is empty."""
    return key_scope(tenant_id, key_id) if key_id else tenant_scope(tenant_id)


def _request_keys(request_id: str, tenant_id: str, key_id: str) -> list[str]:
    """KEYS of RESERVE and APPLY: both scopes, the reservation, the leases."""
    return [tenant_scope(tenant_id), key_scope(tenant_id, key_id), reservation_key(request_id), LEASES]


@dataclass(frozen=True)
class Refusal:
    """Why a reservation was refused: "tenant" or "key" (hard budget),
    "tokens" (tokens per minute; retry after `retry_after_ms`), "too_large"."""

    reason: str
    retry_after_ms: int


@dataclass(frozen=True)
class Headroom:
    """What a tenant's key had left just after a reservation: micro-units
    before the nearer hard budget, tokens in its emptier bucket (None: no
    budget, no bucket)."""

    money_micros: int | None
    tokens: int | None


class Reservations:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._reserve = client.register_script(RESERVE)
        self._settle = client.register_script(SETTLE)
        self._apply = client.register_script(APPLY)
        self._release = client.register_script(RELEASE_EXPIRED)

    async def reserve(
        self,
        request_id: str,
        tenant_id: str,
        key_id: str,
        amount_micros: int,
        tokens: int,
        lease_ms: int,
        token_buckets: list[str],
    ) -> Refusal | None:
        outcome = await self.admit(request_id, tenant_id, key_id, amount_micros, tokens, lease_ms, token_buckets)
        return outcome if isinstance(outcome, Refusal) else None

    async def admit(
        self,
        request_id: str,
        tenant_id: str,
        key_id: str,
        amount_micros: int,
        tokens: int,
        lease_ms: int,
        token_buckets: list[str],
    ) -> Refusal | Headroom | None:
        """RESERVE: the refusal, or what is left once reserved (None when it
        was reserved before, by a retry of the same request)."""
        keys = [*_request_keys(request_id, tenant_id, key_id), *token_buckets]
        reply = await self._reserve(keys=keys, args=[amount_micros, tokens, lease_ms, request_id])
        ok, wait_ms, reason = int(reply[0]), int(reply[1]), reply[2]
        if not ok:
            return Refusal(reason.decode() if isinstance(reason, bytes) else str(reason), wait_ms)
        if len(reply) < 5:
            return None
        money, left = int(reply[3]), int(reply[4])
        return Headroom(money if money >= 0 else None, left if left >= 0 else None)

    def settle_into(self, pipe: redis.client.Pipeline, request_id: str, actual_micros: int, tokens: int) -> None:
        """Queues a settle on a pipeline (the router sends it with the usage
        event), by the script's hash: NoScriptError if Redis lost it."""
        pipe.evalsha(self._settle.sha, 1, reservation_key(request_id), actual_micros, tokens)

    async def load_scripts(self) -> None:
        await self._redis.script_load(SETTLE)

    async def settle(self, request_id: str, actual_micros: int, tokens: int) -> bool:
        return bool(await self._settle(keys=[reservation_key(request_id)], args=[actual_micros, tokens]))

    async def apply(self, request_id: str, tenant_id: str, key_id: str, cost_micros: int) -> None:
        await self.apply_many([(request_id, tenant_id, key_id, cost_micros)])

    async def apply_many(self, entries: list[tuple[str, str, str, int]]) -> None:
        """APPLY for each (request id, tenant, key, cost), in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for request_id, tenant_id, key_id, cost in entries:
                keys = _request_keys(request_id, tenant_id, key_id)
                await self._apply(keys=keys, args=[cost, request_id], client=pipe)
            await pipe.execute()

    async def release_expired(self, limit: int = 500) -> list[str]:
        ids = await self._release(keys=[LEASES], args=[limit])
        return [i.decode() if isinstance(i, bytes) else str(i) for i in ids]

    async def set_hard_limit(self, tenant_id: str, key_id: str, hard_micros: int) -> None:
        await self._redis.hset(scope_of(tenant_id, key_id), "hard", hard_micros)

    async def set_spent(self, tenant_id: str, key_id: str, spent_micros: int) -> None:
        await self._redis.hset(scope_of(tenant_id, key_id), "spent", spent_micros)

    async def scope(self, tenant_id: str, key_id: str = "") -> dict[str, int]:
        raw: Any = await self._redis.hgetall(scope_of(tenant_id, key_id))
        return {k.decode(): int(float(v)) for k, v in raw.items()}
