"""Tenants and API keys, in SQLite or PostgreSQL (the same SQL on both).

A key is `mk_<key id>_<secret>`; `mk_<key id>` is its visible prefix. Only a
keyed hash of the whole key (HMAC-SHA256 with a server-side pepper) is stored,
so a leaked database reveals no usable key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
import uuid
from dataclasses import dataclass

from mariana_common.errors import InvalidArgument, NotFound
from mariana_common.sql import Database, IntegrityError

KEY_PREFIX = "mk"
ROLES = ("user", "admin")
ENDPOINTS = ("chat", "completions", "embeddings", "models", "moderations")

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    rpm        INTEGER,
    tpm        INTEGER,
    created_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id          TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL REFERENCES tenants(id),
    name        TEXT NOT NULL,
    key_hash    TEXT NOT NULL,
    role        TEXT NOT NULL,
    models      TEXT NOT NULL,
    endpoints   TEXT NOT NULL,
    rpm         INTEGER,
    tpm         INTEGER,
    created_at  DOUBLE PRECISION NOT NULL,
    expires_at  DOUBLE PRECISION,
    revoked_at  DOUBLE PRECISION,
    replaced_by TEXT
);
CREATE INDEX IF NOT EXISTS api_keys_by_tenant ON api_keys (tenant_id)
"""


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True)
class Scopes:
    """What a key may do. Empty model or endpoint sets mean all of them."""

    role: str = "user"
    models: frozenset[str] = frozenset()
    endpoints: frozenset[str] = frozenset()


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant_id: str
    name: str
    key_hash: str
    scopes: Scopes
    rpm: int | None
    tpm: int | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    @property
    def prefix(self) -> str:
        return f"{KEY_PREFIX}_{self.id}"

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


@dataclass(frozen=True)
class IssuedKey:
    record: KeyRecord
    secret: str


def split_key(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    parts = key.split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12 or not parts[2]:
        return None
    return parts[1]


def _csv(values: frozenset[str]) -> str:
    return ",".join(sorted(values))


def _set(text: str) -> frozenset[str]:
    return frozenset(v for v in text.split(",") if v)


_KEY_COLUMNS = "id, tenant_id, name, key_hash, role, models, endpoints, rpm, tpm, created_at, expires_at, revoked_at"


def _key(row: tuple[object, ...]) -> KeyRecord:
    (id_, tenant, name, key_hash, role, models, endpoints, rpm, tpm, created, expires, revoked) = row
    scopes = Scopes(str(role), _set(str(models)), _set(str(endpoints)))
    return KeyRecord(
        str(id_),
        str(tenant),
        str(name),
        str(key_hash),
        scopes,
        rpm if isinstance(rpm, int) else None,
        tpm if isinstance(tpm, int) else None,
        float(created),  # type: ignore[arg-type]
        float(expires) if expires is not None else None,  # type: ignore[arg-type]
        float(revoked) if revoked is not None else None,  # type: ignore[arg-type]
    )


def _check_limit(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InvalidArgument(f"{name} must be at least 1 (or unset for no limit)")


class KeyStore:
    def __init__(self, db: Database, pepper: bytes) -> None:
        if len(pepper) < 16:
            raise ValueError("the key-hash pepper must be at least 16 bytes")
        self._db = db
        self._db.script(SCHEMA)
        self._pepper = pepper

    def hash_key(self, key: str) -> str:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()

    # -- tenants ------------------------------------------------------------

    def create_tenant(self, name: str, rpm: int | None = None, tpm: int | None = None) -> Tenant:
        name = name.strip()
        if not name:
            raise InvalidArgument("a tenant needs a name")
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        tenant = Tenant(f"t_{uuid.uuid4().hex[:12]}", name, rpm, tpm)
        try:
            self._db.execute(
                "INSERT INTO tenants (id, name, rpm, tpm, created_at) VALUES (?, ?, ?, ?, ?)",
                (tenant.id, name, rpm, tpm, time.time()),
            )
        except IntegrityError:
            existing = self.find_tenant(name)
            assert existing is not None
            return existing
        return tenant

    def find_tenant(self, id_or_name: str) -> Tenant | None:
        row = self._db.fetchone(
            "SELECT id, name, rpm, tpm FROM tenants WHERE id = ? OR name = ?", (id_or_name, id_or_name)
        )
        return Tenant(*row) if row else None  # type: ignore[arg-type]

    def list_tenants(self) -> list[Tenant]:
        return [Tenant(*r) for r in self._db.fetchall("SELECT id, name, rpm, tpm FROM tenants ORDER BY name")]  # type: ignore[arg-type]

    # -- keys ---------------------------------------------------------------

    def create_key(
        self,
        tenant_id: str,
        name: str = "",
        scopes: Scopes = Scopes(),
        rpm: int | None = None,
        tpm: int | None = None,
        expires_at: float | None = None,
    ) -> IssuedKey:
        if self.find_tenant(tenant_id) is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        if scopes.role not in ROLES:
            raise InvalidArgument(f"role must be one of {', '.join(ROLES)}")
        unknown = scopes.endpoints - set(ENDPOINTS)
        if unknown:
            raise InvalidArgument(f"unknown endpoints {sorted(unknown)}; known: {', '.join(ENDPOINTS)}")
        if any("," in m or not m.strip() for m in scopes.models):
            raise InvalidArgument("model names must be non-empty and contain no commas")
        _check_limit("rpm", rpm)
        _check_limit("tpm", tpm)
        now = time.time()
        if expires_at is not None and expires_at <= now:
            raise InvalidArgument("expires_at must be in the future")
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32).replace('_', '-')}"
        record = KeyRecord(key_id, tenant_id, name, self.hash_key(secret), scopes, rpm, tpm, now, expires_at, None)
        self._db.execute(
            f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
            (
                key_id,
                tenant_id,
                name,
                record.key_hash,
                scopes.role,
                _csv(scopes.models),
                _csv(scopes.endpoints),
                rpm,
                tpm,
                now,
                expires_at,
            ),
        )
        return IssuedKey(record, secret)

    def lookup(self, key_id: str) -> KeyRecord | None:
        row = self._db.fetchone(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE id = ?", (key_id,))
        return _key(row) if row else None

    def list_keys(self, tenant_id: str) -> list[KeyRecord]:
        rows = self._db.fetchall(
            f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE tenant_id = ? ORDER BY created_at", (tenant_id,)
        )
        return [_key(r) for r in rows]

    def revoke(self, key_id: str) -> KeyRecord:
        if (
            not self._db.execute(
                "UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (time.time(), key_id)
            )
            and self.lookup(key_id) is None
        ):
            raise NotFound(f"no key {key_id!r}")
        record = self.lookup(key_id)
        assert record is not None
        return record

    def rotate(self, key_id: str, grace_s: float = 0) -> IssuedKey:
        """A new secret with the same tenant, scopes and limits; the old key
        stops working after `grace_s` seconds (at once when 0)."""
        old = self.lookup(key_id)
        if old is None:
            raise NotFound(f"no key {key_id!r}")
        if not old.usable(time.time()):
            raise InvalidArgument(f"key {key_id} is revoked or expired; create a new one")
        issued = self.create_key(old.tenant_id, old.name, old.scopes, old.rpm, old.tpm, old.expires_at)
        with self._db.transaction():
            self._db.execute("UPDATE api_keys SET replaced_by = ? WHERE id = ?", (issued.record.id, key_id))
            if grace_s > 0:
                ends = min(time.time() + grace_s, old.expires_at or float("inf"))
                self._db.execute("UPDATE api_keys SET expires_at = ? WHERE id = ?", (ends, key_id))
            else:
                self._db.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
        return issued
