"""Generated gRPC stubs through the same edge, and what the mesh refuses."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mariana.auth.v1 import auth_pb2, auth_pb2_grpc
from mariana.llm.v1 import llm_pb2, llm_pb2_grpc
from mariana.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from mariana_common.channels import MeshChannel
from mariana_common.tls import CertificateFiles
from mesh.pki import CertFiles, mint_mesh
from tests.e2e.conftest import MODEL, Platform, TenantKey, create_key_with_cli
from tests.e2e.ledger import ledger_entries, wait_for_ledger

pytestmark = pytest.mark.e2e


def auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def question(**extra: object) -> llm_pb2.CreateChatCompletionRequest:
    request = llm_pb2.CreateChatCompletionRequest(model=MODEL, max_tokens=12, temperature=0, **extra)  # type: ignore[arg-type]
    message = request.messages.add(role="user")
    message.content.string_value = "What is the capital of France?"
    return request


def test_grpc_stub_gets_the_same_answer_as_rest(
    platform: Platform, tenant_key: TenantKey, client: openai.OpenAI
) -> None:
    rest = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    with grpc.insecure_channel(platform.edge) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        unary = stub.CreateChatCompletion(question(), metadata=auth(tenant_key.secret), timeout=60)
        streamed = list(stub.StreamChatCompletion(question(), metadata=auth(tenant_key.secret), timeout=60))
    assert unary.choices[0].message.content == rest.choices[0].message.content
    assert unary.usage.completion_tokens == rest.usage.completion_tokens  # type: ignore[union-attr]
    text = "".join(c.choices[0].delta.content for c in streamed if c.choices)
    assert text == unary.choices[0].message.content
    assert streamed[0].choices[0].delta.role == "assistant"
    assert streamed[-1].choices[0].finish_reason in ("stop", "length")


def test_where_the_answer_came_from_is_in_the_metadata(platform: Platform, tenant_key: TenantKey) -> None:
    """A whole answer's route is trailing metadata (sent with the status, no
    write of its own), a stream's is initial metadata (before the first chunk);
    over HTTP both are response headers."""
    request = question()
    request.temperature = 0.5  # never cached: the route is the pool's
    with grpc.insecure_channel(platform.edge) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        _, unary = stub.CreateChatCompletion.with_call(request, metadata=auth(tenant_key.secret), timeout=60)
        stream = stub.StreamChatCompletion(request, metadata=auth(tenant_key.secret), timeout=60)
        list(stream)
        trailing, initial = dict(unary.trailing_metadata()), dict(stream.initial_metadata())
    for route in (trailing, initial):
        assert route["x-mariana-model"] == MODEL
        assert route["x-mariana-route"] == "primary" and route["x-mariana-pool"] == "local"
    body = {"model": MODEL, "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    with httpx.stream(
        "POST",
        f"http://{platform.edge}/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {tenant_key.secret}"},
        timeout=60,
    ) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        assert reply.headers["x-mariana-route"] == "primary" and reply.headers["x-mariana-model"] == MODEL


def test_grpc_bad_key_is_unauthenticated(platform: Platform) -> None:
    with grpc.insecure_channel(platform.edge) as channel:
        stub = llm_pb2_grpc.LlmServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.ListModels(llm_pb2.ListModelsRequest(), metadata=auth("mk_000000000000_x"), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_grpc_flagged_prompt_is_invalid_argument(platform: Platform, tenant_key: TenantKey) -> None:
    request = question()
    request.messages[0].content.string_value = "call me on +1 415 555 0132"
    with grpc.insecure_channel(platform.edge) as channel:
        with pytest.raises(grpc.RpcError) as error:
            llm_pb2_grpc.LlmServiceStub(channel).CreateChatCompletion(
                request, metadata=auth(tenant_key.secret), timeout=30
            )
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
    assert "pii (phone)" in error.value.details()  # type: ignore[attr-defined]


def test_admin_api_needs_the_admin_key(platform: Platform, tenant_key: TenantKey) -> None:
    with grpc.insecure_channel(platform.edge) as channel:
        stub = auth_pb2_grpc.AuthAdminServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            stub.CreateKey(auth_pb2.CreateKeyRequest(tenant="mallory"), metadata=auth(tenant_key.secret), timeout=10)
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_forged_identity_headers_are_ignored(platform: Platform, tenant_key: TenantKey) -> None:
    victim = create_key_with_cli(platform, "victim")
    reply = httpx.post(
        f"http://{platform.edge}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        headers={
            "Authorization": f"Bearer {tenant_key.secret}",
            "x-mariana-tenant": victim.tenant_id,
            "x-mariana-key-id": victim.key_id,
            "x-request-id": "chosen-by-the-client",
        },
        timeout=60,
    )
    assert reply.status_code == 200, reply.text
    request_id = reply.json()["id"].removeprefix("chatcmpl-")
    assert request_id != "chosen-by-the-client"  # the edge assigns request ids (the ledger's idempotency key)
    (entry,) = wait_for_ledger(platform, tenant_key.tenant_id, [request_id])
    assert entry.key_id == tenant_key.key_id
    assert ledger_entries(platform, victim.tenant_id) == []


@pytest.mark.parametrize("service", ["auth", "router", "inference", "moderation", "billing"])
def test_plaintext_to_a_service_port_is_refused(platform: Platform, service: str) -> None:
    (port,) = platform.plan.service_ports[service]
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        with pytest.raises(grpc.RpcError) as error:
            llm_pb2_grpc.LlmServiceStub(channel).ListModels(llm_pb2.ListModelsRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_mesh_listener_refuses_a_caller_not_in_the_topology(platform: Platform) -> None:
    """billing holds a valid mesh certificate but may not call moderation."""
    certs = platform.plan.certs["billing"]
    credentials = grpc.ssl_channel_credentials(certs.ca.read_bytes(), certs.key.read_bytes(), certs.cert.read_bytes())
    with grpc.secure_channel(platform.plan.mesh_target("moderation"), credentials) as channel:
        with pytest.raises(grpc.RpcError) as error:
            moderation_pb2_grpc.ModerationServiceStub(channel).Check(
                moderation_pb2.CheckRequest(texts=["x"]), timeout=5
            )
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]


def test_mesh_listener_admits_a_declared_caller(platform: Platform) -> None:
    certs = platform.plan.certs["router"]
    credentials = grpc.ssl_channel_credentials(certs.ca.read_bytes(), certs.key.read_bytes(), certs.cert.read_bytes())
    with grpc.secure_channel(platform.plan.mesh_target("moderation"), credentials) as channel:
        reply = moderation_pb2_grpc.ModerationServiceStub(channel).Check(
            moderation_pb2.CheckRequest(texts=["mail x@example.com"]), timeout=5
        )
    assert reply.results[0].categories["pii"]
    assert reply.results[0].findings[0].kind == "email"


async def _check_over_the_bridge(platform: Platform, caller: str) -> moderation_pb2.CheckResponse:
    certs = platform.plan.certs[caller]
    channel = MeshChannel(
        platform.plan.mesh_target("moderation"),
        CertificateFiles(certs.cert, certs.key, certs.ca),
        unary_over_http1=True,
    )
    try:
        stub = moderation_pb2_grpc.ModerationServiceStub(channel)
        return await stub.Check(moderation_pb2.CheckRequest(texts=["mail x@example.com"]), timeout=5)
    finally:
        await channel.close()


async def test_the_http1_bridge_keeps_the_mesh_rules(platform: Platform) -> None:
    """Unary calls over HTTP/1.1 (what services send the mesh) meet the same
    RBAC as gRPC over h2: a declared caller gets its answer, another workload
    PERMISSION_DENIED."""
    reply = await _check_over_the_bridge(platform, "router")
    assert reply.results[0].findings[0].kind == "email"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await _check_over_the_bridge(platform, "billing")
    assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _credentials(certs: CertFiles, ca: CertFiles | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials((ca or certs).ca.read_bytes(), certs.key.read_bytes(), certs.cert.read_bytes())


@pytest.mark.parametrize("service", ["auth", "router", "inference", "moderation", "billing"])
def test_a_workload_calling_a_service_port_around_envoy_is_permission_denied(platform: Platform, service: str) -> None:
    """A valid mesh certificate is not enough on a service's own port: only
    Envoy may call there, so nothing gets around Envoy's RBAC (or ext_authz)."""
    (port,) = platform.plan.service_ports[service]
    caller = "billing" if service != "billing" else "router"
    with grpc.secure_channel(f"127.0.0.1:{port}", _credentials(platform.plan.certs[caller])) as channel:
        with pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert error.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
    with grpc.secure_channel(f"127.0.0.1:{port}", _credentials(platform.plan.certs["envoy"])) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("service", ["inference", "moderation", "billing"])
def test_mesh_listener_refuses_a_certificate_from_another_ca(platform: Platform, service: str, tmp_path: Path) -> None:
    """Same identity name (router), signed by a CA the mesh does not trust."""
    foreign = mint_mesh(tmp_path, platform.plan.topology.trust_domain, ["router"])["router"]
    credentials = _credentials(foreign, ca=platform.plan.certs["router"])
    with grpc.secure_channel(platform.plan.mesh_target(service), credentials) as channel:
        with pytest.raises(grpc.RpcError) as error:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]


def test_the_tenant_backstop_is_in_front_of_the_router(platform: Platform, tenant_key: TenantKey) -> None:
    """Envoy's per-tenant bucket announces itself on answers (the limit from the topology)."""
    reply = httpx.get(
        f"http://{platform.edge}/v1/models", headers={"Authorization": f"Bearer {tenant_key.secret}"}, timeout=30
    )
    assert reply.status_code == 200
    limit = platform.plan.topology.edge.tenant_rate_limit
    assert limit is not None
    assert reply.headers["x-ratelimit-limit"].split(",")[0] == str(limit.burst)
