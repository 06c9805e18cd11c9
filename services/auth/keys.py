"""Tenants and API keys in SQLite. A key is `mk_<key id>_<secret>`; only a keyed
hash (HMAC-SHA256 with a server-side pepper) of the whole key is stored, next to
the key id, so a leaked database reveals no usable key."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from mariana_common.errors import InvalidArgument, NotFound

KEY_PREFIX = "mk"

SCHEMA = """
CREATE TABLE IF NOT EXISTS tenants (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS api_keys (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    name       TEXT NOT NULL,
    key_hash   TEXT NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


@dataclass(frozen=True)
class Tenant:
    id: str
    name: str


@dataclass(frozen=True)
class KeyRecord:
    id: str
    tenant_id: str
    key_hash: str
    revoked: bool


@dataclass(frozen=True)
class IssuedKey:
    key_id: str
    tenant_id: str
    secret: str


def split_key(key: str) -> str | None:
    """The key id of a well-formed key, else None."""
    parts = key.split("_")
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != 12 or not parts[2]:
        return None
    return parts[1]


class KeyStore:
    def __init__(self, path: Path, pepper: bytes) -> None:
        if len(pepper) < 16:
            raise ValueError("the key-hash pepper must be at least 16 bytes")
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        self._pepper = pepper
        self._lock = threading.Lock()

    def hash_key(self, key: str) -> str:
        return hmac.new(self._pepper, key.encode(), hashlib.sha256).hexdigest()

    def create_tenant(self, name: str) -> Tenant:
        name = name.strip()
        if not name:
            raise InvalidArgument("a tenant needs a name")
        tenant = Tenant(f"t_{uuid.uuid4().hex[:12]}", name)
        with self._lock:
            try:
                self._db.execute("INSERT INTO tenants VALUES (?, ?, ?)", (tenant.id, name, time.time()))
            except sqlite3.IntegrityError:
                row = self._db.execute("SELECT id, name FROM tenants WHERE name = ?", (name,)).fetchone()
                return Tenant(*row)
        return tenant

    def find_tenant(self, id_or_name: str) -> Tenant | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, name FROM tenants WHERE id = ? OR name = ?", (id_or_name, id_or_name)
            ).fetchone()
        return Tenant(*row) if row else None

    def create_key(self, tenant_id: str, name: str = "") -> IssuedKey:
        if self.find_tenant(tenant_id) is None:
            raise NotFound(f"no tenant {tenant_id!r}")
        key_id = secrets.token_hex(6)
        secret = f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32).replace('_', '-')}"
        with self._lock:
            self._db.execute(
                "INSERT INTO api_keys VALUES (?, ?, ?, ?, ?, NULL)",
                (key_id, tenant_id, name, self.hash_key(secret), time.time()),
            )
        return IssuedKey(key_id, tenant_id, secret)

    def lookup(self, key_id: str) -> KeyRecord | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, tenant_id, key_hash, revoked_at IS NOT NULL FROM api_keys WHERE id = ?",
                (key_id,),
            ).fetchone()
        return KeyRecord(row[0], row[1], row[2], bool(row[3])) if row else None

    def close(self) -> None:
        self._db.close()
