from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mariana_common.errors import PermissionDenied, Unauthenticated
from mariana_common.sql import Database
from services.auth.authorizer import INVALID_KEY, Authorizer, endpoint_of
from services.auth.store import KeyRecord, KeyStore, Scopes

MASTER = "sk-master-for-tests-0123456789"


@pytest.fixture
def store(tmp_path: Path) -> KeyStore:
    return KeyStore(Database(f"sqlite:///{tmp_path / 'keys.db'}"), b"p" * 32)


@pytest.fixture
def authorizer(store: KeyStore) -> Authorizer:
    return Authorizer(store, MASTER, cache_ttl_s=0)


async def test_issued_key_identifies_its_tenant(store: KeyStore, authorizer: Authorizer) -> None:
    tenant = store.create_tenant("acme", rpm=9)
    issued = store.create_key(tenant.id, "ci", rpm=3)
    verdict = await authorizer.authorize(f"Bearer {issued.secret}", "/v1/chat/completions")
    identity = verdict.identity
    assert (identity.tenant_id, identity.key_id, identity.admin) == (tenant.id, issued.record.id, False)
    assert (identity.rpm, identity.tenant_rpm) == (3, 9)


@pytest.mark.parametrize(
    "header", ["", "Bearer", "Basic abc", "Bearer mk_nope", "Bearer mk_000000000000_wrong", "bearer  "]
)
async def test_bad_credentials_are_unauthenticated(authorizer: Authorizer, header: str) -> None:
    with pytest.raises(Unauthenticated):
        await authorizer.authorize(header, "/v1/models")


async def test_failures_say_the_same_whatever_was_wrong(store: KeyStore, authorizer: Authorizer) -> None:
    issued = store.create_key(store.create_tenant("acme").id)
    revoked = store.create_key(store.create_tenant("acme").id)
    store.revoke(revoked.record.id)
    messages = set()
    for token in (issued.secret[:-4] + "AAAA", "mk_ffffffffffff_xyz", revoked.secret):
        with pytest.raises(Unauthenticated) as error:
            await authorizer.authorize(f"Bearer {token}", "/v1/models")
        messages.add(str(error.value))
    assert messages == {INVALID_KEY}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


async def test_expired_key_stops_working(store: KeyStore) -> None:
    clock = Clock()
    issued = store.create_key(store.create_tenant("acme").id, expires_at=clock.now + 10)
    fresh = Authorizer(store, None, cache_ttl_s=0, wall_clock=clock)
    cached = Authorizer(store, None, cache_ttl_s=60, wall_clock=clock)  # even a cached identity expires on time
    for which in (fresh, cached):
        await which.authorize(f"Bearer {issued.secret}", "/v1/models")
    clock.now += 11
    for which in (fresh, cached):
        with pytest.raises(Unauthenticated):
            await which.authorize(f"Bearer {issued.secret}", "/v1/models")


async def test_revocation_is_seen_within_the_cache_ttl(store: KeyStore) -> None:
    clock = Clock()
    replica = Authorizer(store, None, cache_ttl_s=1.0, monotonic=clock)  # another replica, which did not revoke
    issued = store.create_key(store.create_tenant("acme").id)
    await replica.authorize(f"Bearer {issued.secret}", "/v1/models")
    store.revoke(issued.record.id)
    clock.now += 0.5
    await replica.authorize(f"Bearer {issued.secret}", "/v1/models")  # still cached: the documented lag
    clock.now += 0.6
    with pytest.raises(Unauthenticated):
        await replica.authorize(f"Bearer {issued.secret}", "/v1/models")


async def test_admin_paths_need_admin(store: KeyStore, authorizer: Authorizer) -> None:
    tenant = store.create_tenant("acme")
    user = store.create_key(tenant.id)
    admin = store.create_key(tenant.id, scopes=Scopes(role="admin"))
    for path in ("/mariana.auth.v1.AuthAdminService/CreateKey", "/admin/v1/keys", "/mariana.billing.v1.X/Y"):
        with pytest.raises(PermissionDenied):
            await authorizer.authorize(f"Bearer {user.secret}", path)
        assert (await authorizer.authorize(f"Bearer {admin.secret}", path)).identity.admin
        assert (await authorizer.authorize(f"Bearer {MASTER}", path)).identity.admin


async def test_endpoint_scopes(store: KeyStore, authorizer: Authorizer) -> None:
    key = store.create_key(store.create_tenant("acme").id, scopes=Scopes(endpoints=frozenset({"embeddings"})))
    await authorizer.authorize(f"Bearer {key.secret}", "/v1/embeddings")
    await authorizer.authorize(f"Bearer {key.secret}", "/mariana.llm.v1.LlmService/CreateEmbedding")
    for path in ("/v1/chat/completions", "/mariana.llm.v1.LlmService/StreamChatCompletion", "/v1/models?x=1"):
        with pytest.raises(PermissionDenied):
            await authorizer.authorize(f"Bearer {key.secret}", path)


def test_endpoint_of() -> None:
    assert endpoint_of("/v1/chat/completions:stream") == "chat"
    assert endpoint_of("/v1/models?limit=2") == "models"
    assert endpoint_of("/v2/other") is None


async def test_no_master_key_means_no_admin(store: KeyStore) -> None:
    with pytest.raises(Unauthenticated):
        await Authorizer(store, None).authorize(f"Bearer {MASTER}", "/v1/models")


class FixedBudgets:
    def __init__(self, over: set[str]) -> None:
        self.over = over

    async def over_hard_limit(self, tenant_id: str, key_id: str) -> bool:
        return tenant_id in self.over or key_id in self.over


async def test_tenant_over_its_hard_budget_is_refused(store: KeyStore) -> None:
    from services.auth.authorizer import QuotaExceeded

    broke, fine = store.create_tenant("broke"), store.create_tenant("fine")
    authorizer = Authorizer(store, MASTER, budgets=FixedBudgets({broke.id}))
    with pytest.raises(QuotaExceeded):
        await authorizer.authorize(f"Bearer {store.create_key(broke.id).secret}", "/v1/models")
    await authorizer.authorize(f"Bearer {store.create_key(fine.id).secret}", "/v1/models")
    await authorizer.authorize(f"Bearer {MASTER}", "/v1/models")  # admins are not budgeted


class CountingStore(KeyStore):
    lookups = 0

    def lookup(self, key_id: str) -> KeyRecord | None:
        self.lookups += 1
        return super().lookup(key_id)


async def test_a_burst_with_one_new_key_looks_it_up_once(tmp_path: Path) -> None:
    store = CountingStore(Database(f"sqlite:///{tmp_path / 'keys.db'}"), b"p" * 32)
    authorizer = Authorizer(store, None, cache_ttl_s=60)
    issued = store.create_key(store.create_tenant("acme").id)
    verdicts = await asyncio.gather(*(authorizer.authorize(f"Bearer {issued.secret}", "/v1/models") for _ in range(50)))
    assert {v.identity.key_id for v in verdicts} == {issued.record.id} and store.lookups == 1
    wrong = f"mk_{issued.record.id}_not-the-secret"
    refused = await asyncio.gather(
        *(authorizer.authorize(f"Bearer {wrong}", "/v1/models") for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, Unauthenticated) for r in refused) and store.lookups == 2
