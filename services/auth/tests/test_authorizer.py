from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mariana_common.errors import NotFound, PermissionDenied, Unauthenticated
from services.auth.authorizer import INVALID_KEY, Authorizer
from services.auth.keys import KeyStore

MASTER = "sk-master-for-tests-0123456789"


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path / "keys.db", b"p" * 32)


@pytest.fixture
def authorizer(store: KeyStore) -> Authorizer:
    return Authorizer(store, MASTER, cache_ttl_s=0)


def test_issued_key_identifies_its_tenant(store: KeyStore, authorizer: Authorizer) -> None:
    tenant = store.create_tenant("acme")
    issued = store.create_key(tenant.id, "ci")
    identity = authorizer.authorize(f"Bearer {issued.secret}", "/v1/chat/completions")
    assert (identity.tenant_id, identity.key_id, identity.admin) == (tenant.id, issued.key_id, False)


def test_secret_is_never_stored(tmp_path: Path, store: KeyStore) -> None:
    issued = store.create_key(store.create_tenant("acme").id)
    rows = sqlite3.connect(tmp_path / "keys.db").execute("SELECT * FROM api_keys").fetchall()
    assert issued.secret not in repr(rows)
    assert issued.secret.split("_")[2] not in repr(rows)


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Basic abc", "Bearer mk_nope", "Bearer mk_000000000000_wrong", "bearer  "],
)
def test_bad_credentials_are_unauthenticated(authorizer: Authorizer, header: str) -> None:
    with pytest.raises(Unauthenticated):
        authorizer.authorize(header, "/v1/models")


def test_wrong_secret_for_real_key_id_says_the_same(store: KeyStore, authorizer: Authorizer) -> None:
    issued = store.create_key(store.create_tenant("acme").id)
    forged = issued.secret[:-4] + "AAAA"
    with pytest.raises(Unauthenticated) as wrong:
        authorizer.authorize(f"Bearer {forged}", "/v1/models")
    with pytest.raises(Unauthenticated) as unknown:
        authorizer.authorize("Bearer mk_ffffffffffff_xyz", "/v1/models")
    assert str(wrong.value) == str(unknown.value) == INVALID_KEY


def test_admin_paths_need_admin(store: KeyStore, authorizer: Authorizer) -> None:
    issued = store.create_key(store.create_tenant("acme").id)
    for path in ("/mariana.auth.v1.AuthAdminService/CreateKey", "/mariana.billing.v1.BillingService/GetUsage"):
        with pytest.raises(PermissionDenied):
            authorizer.authorize(f"Bearer {issued.secret}", path)
        assert authorizer.authorize(f"Bearer {MASTER}", path).admin


def test_no_master_key_means_no_admin(store: KeyStore) -> None:
    with pytest.raises(Unauthenticated):
        Authorizer(store, None).authorize(f"Bearer {MASTER}", "/v1/models")


def test_key_for_unknown_tenant_is_refused(store: KeyStore) -> None:
    with pytest.raises(NotFound):
        store.create_key("t_missing")


def test_tenant_names_are_unique(store: KeyStore) -> None:
    assert store.create_tenant("acme") == store.create_tenant("acme")
