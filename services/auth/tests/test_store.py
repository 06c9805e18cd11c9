"""The key store on SQLite and on a real PostgreSQL server (same code)."""

from __future__ import annotations

import time

import pytest

from mariana_common.errors import InvalidArgument, NotFound
from mariana_common.sql import Database
from services.auth.store import KeyStore, Scopes


@pytest.fixture
def store(database_url: str) -> KeyStore:
    return KeyStore(Database(database_url), b"p" * 32)


def test_secret_is_never_stored(store: KeyStore, database_url: str) -> None:
    issued = store.create_key(store.create_tenant("acme").id)
    rows = Database(database_url).fetchall("SELECT * FROM api_keys")
    assert issued.secret not in repr(rows)
    assert issued.secret.split("_")[2] not in repr(rows)
    assert issued.record.prefix == f"mk_{issued.record.id}" and issued.secret.startswith(issued.record.prefix)


def test_tenants_are_unique_by_name(store: KeyStore) -> None:
    first = store.create_tenant("acme", rpm=10)
    assert store.create_tenant("acme") == first
    assert store.find_tenant("acme") == store.find_tenant(first.id) == first
    assert [t.name for t in store.list_tenants()] == ["acme"]


def test_scopes_and_limits_round_trip(store: KeyStore) -> None:
    tenant = store.create_tenant("acme")
    scopes = Scopes("user", frozenset({"m1", "m2"}), frozenset({"chat"}))
    issued = store.create_key(tenant.id, "ci", scopes, rpm=5, tpm=1000, expires_at=time.time() + 60)
    record = store.lookup(issued.record.id)
    assert record == issued.record
    assert [k.id for k in store.list_keys(tenant.id)] == [issued.record.id]


def test_revoke_and_rotate(store: KeyStore) -> None:
    tenant = store.create_tenant("acme")
    old = store.create_key(tenant.id, "svc", Scopes("user", frozenset({"m"})), rpm=7)
    new = store.rotate(old.record.id)
    assert new.secret != old.secret
    assert (new.record.scopes, new.record.rpm) == (old.record.scopes, old.record.rpm)
    assert not store.lookup(old.record.id).usable(time.time())  # type: ignore[union-attr]
    graceful = store.rotate(new.record.id, grace_s=30)
    still = store.lookup(new.record.id)
    assert still is not None and still.usable(time.time()) and not still.usable(time.time() + 31)
    assert store.revoke(graceful.record.id).revoked_at is not None
    with pytest.raises(InvalidArgument):
        store.rotate(graceful.record.id)


@pytest.mark.parametrize(
    "bad",
    [
        {"scopes": Scopes(role="root")},
        {"scopes": Scopes(endpoints=frozenset({"shell"}))},
        {"scopes": Scopes(models=frozenset({"a,b"}))},
        {"rpm": 0},
        {"expires_at": 1.0},
    ],
)
def test_bad_keys_are_refused(store: KeyStore, bad: dict[str, object]) -> None:
    tenant = store.create_tenant("acme")
    with pytest.raises(InvalidArgument):
        store.create_key(tenant.id, **bad)  # type: ignore[arg-type]


def test_missing_things_are_not_found(store: KeyStore) -> None:
    with pytest.raises(NotFound):
        store.create_key("t_missing")
    with pytest.raises(NotFound):
        store.revoke("000000000000")
    assert store.lookup("000000000000") is None
