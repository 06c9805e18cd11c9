"""Auth at the edge, on the running platform: the admin API over REST, key
scopes, revocation, expiry and rate limits, seen by real clients."""

from __future__ import annotations

import time

import grpc
import httpx
import openai
import pytest

from mariana.llm.v1 import llm_pb2, llm_pb2_grpc
from tests.e2e.conftest import EMBEDDER, MODEL, Platform, first_refusal
from tests.e2e.ledger import wait_for_ledger

pytestmark = pytest.mark.e2e


def admin(platform: Platform, method: str, path: str, key: str | None = None, **body: object) -> httpx.Response:
    return httpx.request(
        method,
        f"http://{platform.edge}{path}",
        json=body if method == "POST" else None,
        headers={"Authorization": f"Bearer {key or platform.master_key}"},
        timeout=10,
    )


def new_key(platform: Platform, **fields: object) -> dict[str, object]:
    reply = admin(platform, "POST", "/admin/v1/keys", **fields)
    assert reply.status_code == 200, reply.text
    return reply.json()  # type: ignore[no-any-return]


def test_admin_rest_api_issues_lists_and_revokes(platform: Platform) -> None:
    created = new_key(platform, tenant="rest-tenant", name="ci", models=[MODEL], rpm=100)
    secret, key_id, tenant_id = created["secret"], created["key_id"], created["tenant_id"]
    assert str(secret).startswith(f"mk_{key_id}_")
    listed = admin(platform, "GET", f"/admin/v1/tenants/{tenant_id}/keys").json()["keys"]
    assert [(k["key_id"], k["prefix"], k["models"], k["rpm"]) for k in listed] == [
        (key_id, f"mk_{key_id}", [MODEL], 100)
    ]
    assert "secret" not in str(listed) and str(secret) not in str(listed)
    client = platform.openai(str(secret))
    assert [m.id for m in client.models.list()] == [MODEL]
    started = time.monotonic()
    assert admin(platform, "POST", f"/admin/v1/keys/{key_id}:revoke").status_code == 200
    while True:
        try:
            client.models.list()
        except openai.AuthenticationError:
            break
        assert time.monotonic() - started < 1.0, "revoked key still works after 1 s"
    assert admin(platform, "GET", "/admin/v1/tenants", key=str(secret)).status_code == 401


def test_admin_rest_api_manages_tenants(platform: Platform) -> None:
    created = admin(platform, "POST", "/admin/v1/tenants", name="tenant-by-rest", rpm=7, tpm=700)
    assert created.status_code == 200, created.text
    tenant = created.json()["tenant"]
    assert (tenant["name"], tenant["rpm"], tenant["tpm"]) == ("tenant-by-rest", 7, 700)
    listed = admin(platform, "GET", "/admin/v1/tenants").json()["tenants"]
    assert tenant in listed
    assert admin(platform, "POST", "/admin/v1/tenants", name="  ").status_code == 400


def test_admin_api_refuses_a_tenant_key(platform: Platform) -> None:
    user = new_key(platform, tenant="plain-tenant")
    reply = admin(platform, "POST", "/admin/v1/keys", key=str(user["secret"]), tenant="plain-tenant")
    assert reply.status_code == 403
    assert reply.json()["error"]["code"] == "permission_denied"


def test_rotation_swaps_the_secret(platform: Platform) -> None:
    old = new_key(platform, tenant="rotating")
    rotated = admin(platform, "POST", f"/admin/v1/keys/{old['key_id']}:rotate").json()
    assert platform.openai(str(rotated["secret"])).models.list()
    with pytest.raises(openai.AuthenticationError):
        platform.openai(str(old["secret"])).models.list()


def test_model_and_endpoint_scopes(platform: Platform) -> None:
    only_embeddings = platform.openai(str(new_key(platform, tenant="scoped", models=[EMBEDDER])["secret"]))
    assert len(only_embeddings.embeddings.create(model=EMBEDDER, input="hi").data) == 1
    with pytest.raises(openai.PermissionDeniedError, match="may not use model"):
        only_embeddings.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    only_models = platform.openai(str(new_key(platform, tenant="scoped", endpoints=["models"])["secret"]))
    assert only_models.models.list()
    with pytest.raises(openai.PermissionDeniedError):
        only_models.moderations.create(input="hi")


def test_expired_key_is_refused(platform: Platform) -> None:
    client = platform.openai(str(new_key(platform, tenant="short-lived", expires_in_seconds=1)["secret"]))
    assert client.models.list()
    first_refusal(client.models.list, openai.AuthenticationError, "expired key still works", timeout_s=5)


def test_requests_per_minute_limit(platform: Platform) -> None:
    client = platform.openai(str(new_key(platform, tenant="rpm-tenant", rpm=3)["secret"]))
    for _ in range(3):
        raw = client.models.with_raw_response.list()
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as refused:
        client.models.list()
    response = refused.value.response
    assert response.status_code == 429 and int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_tokens_per_minute_reserve_the_worst_case_and_settle_to_real_usage(platform: Platform) -> None:
    client = platform.openai(str(new_key(platform, tenant="tpm-tenant", tpm=150)["secret"]))
    question = [{"role": "user", "content": "Tell me about the sea."}]
    # The worst case (prompt bound ~45 + max_tokens 60) fits the minute's 150 tokens once.
    reply = client.chat.completions.create(model=MODEL, messages=question, max_tokens=60, temperature=0)
    assert reply.usage is not None and reply.usage.total_tokens <= 105
    # More of them are refused before inference once the minute cannot hold their worst case.
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(3):
            client.chat.completions.create(model=MODEL, messages=question, max_tokens=60, temperature=0.5)
    response = refused.value.response
    assert response.json()["error"]["code"] == "rate_limit_exceeded" and int(response.headers["retry-after"]) >= 1
    with pytest.raises(openai.RateLimitError) as too_large:  # can never fit the minute
        client.chat.completions.create(model=MODEL, messages=question, max_tokens=500)
    assert "too large" in too_large.value.message


def test_grpc_client_is_rate_limited_too(platform: Platform) -> None:
    key = str(new_key(platform, tenant="grpc-rpm", rpm=1)["secret"])
    with grpc.insecure_channel(platform.edge) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        metadata = (("authorization", f"Bearer {key}"),)
        stub.ListModels(llm_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListModels(llm_pb2.ListModelsRequest(), metadata=metadata, timeout=10)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert "rate_limit_exceeded" in refused.value.details()  # type: ignore[attr-defined]


def test_spend_never_passes_a_hard_budget(platform: Platform) -> None:
    from mariana.billing.v1 import billing_pb2, billing_pb2_grpc

    created = new_key(platform, tenant="budgeted")
    client = platform.openai(str(created["secret"]))
    budget = 30  # micro-units: a few of these requests' worst cases (~9 each)
    with grpc.insecure_channel(platform.edge) as channel:
        billing = billing_pb2_grpc.BillingServiceStub(channel)
        billing.SetBudget(
            billing_pb2.SetBudgetRequest(tenant_id=str(created["tenant_id"]), hard_limit_micros=budget),
            metadata=(("authorization", f"Bearer {platform.master_key}"),),
            timeout=10,
        )
    ids = []
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(20):
            reply = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Hi there"}], max_tokens=20
            )
            ids.append(reply.id.removeprefix("chatcmpl-"))
    assert refused.value.response.json()["error"]["code"] == "insufficient_quota"
    assert ids  # the budget admitted some
    entries = wait_for_ledger(platform, str(created["tenant_id"]), ids)
    assert sum(e.cost_micros for e in entries) <= budget
