"""Who is calling and may they call this path. Every failure to authenticate
gives the same answer, so a caller learns nothing about which keys exist."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from mariana_common.errors import PermissionDenied, Unauthenticated
from services.auth.keys import KeyStore, split_key

ADMIN_PATH_PREFIXES = ("/mariana.auth.v1.", "/mariana.billing.v1.", "/admin/")
SYSTEM_TENANT = "system"
MASTER_KEY_ID = "master"
INVALID_KEY = "invalid API key"


@dataclass(frozen=True)
class Identity:
    tenant_id: str
    key_id: str
    admin: bool


def bearer_token(authorization: str) -> str:
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("expected 'Authorization: Bearer <API key>'")
    return token.strip()


class Authorizer:
    def __init__(self, store: KeyStore, master_key: str | None, cache_ttl_s: float = 1.0) -> None:
        self._store = store
        self._master_key = master_key.encode() if master_key else None
        self._cache_ttl_s = cache_ttl_s
        # key -> (identity, expiry). A short TTL bounds how long a revoked key lives on.
        self._cache: dict[str, tuple[Identity, float]] = {}

    def identify(self, key: str) -> Identity:
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[1] > now:
            return cached[0]
        identity = self._identify_uncached(key)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[key] = (identity, now + self._cache_ttl_s)
        return identity

    def _identify_uncached(self, key: str) -> Identity:
        if self._master_key is not None and hmac.compare_digest(key.encode(), self._master_key):
            return Identity(SYSTEM_TENANT, MASTER_KEY_ID, admin=True)
        key_id = split_key(key)
        record = self._store.lookup(key_id) if key_id else None
        expected = record.key_hash if record else "0" * 64
        matches = hmac.compare_digest(self._store.hash_key(key), expected)
        if record is None or not matches or record.revoked:
            raise Unauthenticated(INVALID_KEY)
        return Identity(record.tenant_id, record.id, admin=False)

    def authorize(self, authorization: str, path: str) -> Identity:
        identity = self.identify(bearer_token(authorization))
        if path.startswith(ADMIN_PATH_PREFIXES) and not identity.admin:
            raise PermissionDenied("this endpoint needs an admin key")
        return identity
