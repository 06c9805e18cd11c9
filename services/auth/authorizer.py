"""Who is calling, may they call this path, and are they within their limits.
Every failure to authenticate gives the same answer, so a caller learns
nothing about which keys exist."""

from __future__ import annotations

import asyncio
import hmac
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as redis
import structlog

from mariana_common.errors import PermissionDenied, Unauthenticated, Unavailable
from mariana_common.outage import OutageGate
from services.auth.budgets import Budgets
from services.auth.jwt_tokens import JwtVerifier, looks_like_jwt
from services.auth.rate_limit import Decision, RateLimiter, limits_for
from services.auth.store import KeyStore, Scopes, split_key

log = structlog.get_logger()

ADMIN_PATH_PREFIXES = ("/mariana.auth.v1.", "/mariana.billing.v1.", "/admin/")
SYSTEM_TENANT = "system"
MASTER_KEY_ID = "master"
INVALID_KEY = "invalid API key"
_LLM = "/mariana.llm.v1.LlmService/"
ENDPOINT_OF_PATH = {
    "/v1/chat/completions": "chat",
    "/v1/chat/completions:stream": "chat",
    _LLM + "CreateChatCompletion": "chat",
    _LLM + "StreamChatCompletion": "chat",
    "/v1/completions": "completions",
    _LLM + "CreateCompletion": "completions",
    "/v1/embeddings": "embeddings",
    _LLM + "CreateEmbedding": "embeddings",
    "/v1/models": "models",
    _LLM + "ListModels": "models",
    "/v1/moderations": "moderations",
    _LLM + "CreateModeration": "moderations",
}
SAFE_SUBJECT = re.compile(r"[^A-Za-z0-9._@:-]")


@dataclass(frozen=True)
class Identity:
    tenant_id: str
    key_id: str
    admin: bool
    scopes: Scopes = field(default_factory=Scopes)
    rpm: int | None = None
    tpm: int | None = None
    tenant_rpm: int | None = None
    tenant_tpm: int | None = None
    expires_at: float | None = None


@dataclass(frozen=True)
class Verdict:
    identity: Identity
    rate: Decision


class QuotaExceeded(Exception):
    """The tenant is over its hard budget (OpenAI's insufficient_quota)."""


class RateLimited(Exception):
    def __init__(self, decision: Decision) -> None:
        super().__init__(f"rate limit reached for {decision.exceeded} per minute")
        self.decision = decision


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("expected 'Authorization: Bearer <API key>'")
    return token.strip()


def endpoint_of(path: str) -> str | None:
    return ENDPOINT_OF_PATH.get(path.partition("?")[0])


class Authorizer:
    def __init__(
        self,
        store: KeyStore,
        master_key: str | None,
        *,
        jwt: JwtVerifier | None = None,
        limiter: RateLimiter | None = None,
        budgets: Budgets | None = None,
        fail_open: bool = True,
        cache_ttl_s: float = 1.0,
        wall_clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._master_key = master_key.encode() if master_key else None
        self._jwt = jwt
        self._limiter = limiter
        self._budgets = budgets
        self._fail_open = fail_open
        self._cache_ttl_s = cache_ttl_s
        self._wall_clock = wall_clock
        self._monotonic = monotonic
        # credential -> (identity, expiry). The TTL bounds how long a key
        # revoked on another replica lives on here.
        self._cache: dict[str, tuple[Identity, float]] = {}
        # credential -> its lookup under way: a burst with one new key looks it up once
        self._looking_up: dict[str, asyncio.Future[Identity]] = {}
        self.limiter_failures = 0
        self._redis_gate = OutageGate(hold_s=1.0, clock=monotonic)

    def invalidate(self) -> None:
        """After a revoke or rotate on this replica: forget every cached decision."""
        self._cache.clear()

    def _identify_key(self, key: str) -> Identity:
        if self._master_key is not None and hmac.compare_digest(key.encode(), self._master_key):
            return Identity(SYSTEM_TENANT, MASTER_KEY_ID, admin=True, scopes=Scopes(role="admin"))
        key_id = split_key(key)
        record = self._store.lookup(key_id) if key_id else None
        matches = hmac.compare_digest(self._store.hash_key(key), record.key_hash if record else "0" * 64)
        if record is None or not matches or not record.usable(self._wall_clock()):
            raise Unauthenticated(INVALID_KEY)
        tenant = self._store.find_tenant(record.tenant_id)
        return Identity(
            record.tenant_id,
            record.id,
            record.scopes.role == "admin",
            record.scopes,
            record.rpm,
            record.tpm,
            tenant.rpm if tenant else None,
            tenant.tpm if tenant else None,
            record.expires_at,
        )

    def _identify_jwt(self, token: str) -> Identity:
        if self._jwt is None:
            raise Unauthenticated(INVALID_KEY)
        claims = self._jwt.verify(token)
        tenant = self._store.find_tenant(claims.issuer.tenant_id)
        if tenant is None:
            raise Unauthenticated(INVALID_KEY)
        subject = SAFE_SUBJECT.sub("_", claims.subject)[:64]
        # The token's own expiry bounds the cached identity too.
        return Identity(
            tenant.id, f"jwt:{subject}", False, Scopes(), None, None, tenant.rpm, tenant.tpm, claims.expires_at
        )

    async def identify(self, token: str) -> Identity:
        now = self._monotonic()
        cached = self._cache.get(token)
        if cached is not None and cached[1] > now:
            identity = cached[0]
            if identity.expires_at is None or self._wall_clock() < identity.expires_at:
                return identity
        pending = self._looking_up.get(token)
        if pending is not None:
            return await asyncio.shield(pending)
        identify = self._identify_jwt if looks_like_jwt(token) else self._identify_key
        lookup = self._looking_up[token] = asyncio.ensure_future(asyncio.to_thread(identify, token))
        try:
            identity = await asyncio.shield(lookup)  # a caller gone does not cancel the others' lookup
        finally:
            if self._looking_up.get(token) is lookup:
                del self._looking_up[token]
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[token] = (identity, now + self._cache_ttl_s)
        return identity

    async def _rate(self, identity: Identity) -> Decision:
        limits = limits_for(
            identity.key_id, identity.tenant_id, identity.rpm, identity.tpm, identity.tenant_rpm, identity.tenant_tpm
        )
        if self._limiter is None or not limits:
            return Decision(True)
        try:
            if self._redis_gate.is_down():  # failed a moment ago: do not wait for another timeout
                raise redis.ConnectionError("redis failed less than a second ago")
            decision = await self._limiter.admit(limits)
            self._redis_gate.succeeded()
            return decision
        except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
            self.limiter_failures += 1
            if not self._redis_gate.is_down():
                log.error("rate limiter unavailable", fail_open=self._fail_open, error=str(error))
                self._redis_gate.failed()
            if self._fail_open:
                return Decision(True)
            raise Unavailable("rate limiting is unavailable; retry shortly", retry_after_s=1) from error

    async def authorize(self, authorization: str, path: str) -> Verdict:
        identity = await self.identify(bearer_token(authorization))
        if path.startswith(ADMIN_PATH_PREFIXES):
            if not identity.admin:
                raise PermissionDenied("this endpoint needs an admin key")
        else:
            endpoint = endpoint_of(path)
            allowed = identity.scopes.endpoints
            if allowed and endpoint not in allowed:
                raise PermissionDenied(f"this key may not use {endpoint or path}")
        if (
            self._budgets is not None
            and not identity.admin
            and await self._budgets.over_hard_limit(identity.tenant_id, identity.key_id)
        ):
            raise QuotaExceeded("You exceeded your current quota: the hard budget of this tenant or key is spent.")
        decision = await self._rate(identity)
        if not decision.allowed:
            raise RateLimited(decision)
        return Verdict(identity, decision)
