"""Real servers on ephemeral ports with the platform's mTLS, called with real
gRPC clients: what each service refuses, and how statuses reach clients."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
import redis.asyncio as aioredis
from envoy_data_plane.envoy.service.auth.v3 import (
    AttributeContext,
    AttributeContextHttpRequest,
    AttributeContextRequest,
    CheckRequest,
    CheckResponse,
)
from pydantic import ValidationError

from mariana.billing.v1 import billing_pb2, billing_pb2_grpc
from mariana.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from mariana_common.channels import mesh_channel
from mariana_common.server import Server, create_server
from mariana_common.settings import ServiceSettings
from mariana_common.sql import Database
from mariana_common.tls import channel_credentials
from mesh.pki import CertFiles, mint_mesh, rotate_workloads
from services.auth import ext_authz
from services.auth.authorizer import Authorizer
from services.auth.rate_limit import RateLimiter
from services.auth.store import KeyStore, Scopes
from services.billing import servicer as billing_servicer
from services.billing.ledger import Ledger
from services.moderation import servicer as moderation_servicer
from services.moderation.moderator import Moderator
from services.moderation.policy import load_policy
from services.moderation.toxicity import ToxicityModel
from services.router.domain import Caller, GenerationRequest, ModelEntry, Piece, UsageRecord
from services.router.tests.test_gateway import make_gateway
from services.router.upstreams import GrpcModeration
from tests.tls_probe import serial_in_file, served_serial

MASTER = "sk-integration-master-key"


def settings_for(certs: CertFiles) -> ServiceSettings:
    return ServiceSettings(tls_cert=certs.cert, tls_key=certs.key, tls_ca=certs.ca, port=0)


def credentials(certs: CertFiles) -> grpc.ChannelCredentials:
    return channel_credentials(certs.cert, certs.key, certs.ca)


@pytest.fixture
async def moderation(pki: dict[str, CertFiles]) -> AsyncIterator[Server]:
    policy = load_policy()
    moderator = Moderator(ToxicityModel.load(), lambda: policy, ["bomb"])
    server = create_server(settings_for(pki["moderation"]), moderation_servicer.register(moderator), ["m"])
    await server.start()
    yield server
    await server.stop(0)


async def test_mtls_call_succeeds(moderation: Server, pki: dict[str, CertFiles]) -> None:
    async with grpc.aio.secure_channel(f"127.0.0.1:{moderation.port}", credentials(pki["envoy"])) as channel:
        stub = moderation_pb2_grpc.ModerationServiceStub(channel)
        reply = await stub.Check(moderation_pb2.CheckRequest(texts=["hi", "a bomb"]), timeout=5)
    assert [r.flagged for r in reply.results] == [False, True]
    assert reply.results[1].findings[0].category == "blocklist"
    assert reply.results[1].action == moderation_pb2.ACTION_BLOCK


async def test_decision_only_checks_leave_out_scores_and_unchanged_text(
    moderation: Server, pki: dict[str, CertFiles]
) -> None:
    texts = ["hi there", "mail me at someone@example.com", "a bomb"]
    async with grpc.aio.secure_channel(f"127.0.0.1:{moderation.port}", credentials(pki["envoy"])) as channel:
        stub = moderation_pb2_grpc.ModerationServiceStub(channel)
        full = await stub.Check(moderation_pb2.CheckRequest(texts=texts, tenant_id="t"), timeout=5)
        brief = await stub.Check(moderation_pb2.CheckRequest(texts=texts, tenant_id="t", decision_only=True), timeout=5)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Check(moderation_pb2.CheckRequest(texts=texts, contexts=["only one"]), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [r.action for r in brief.results] == [r.action for r in full.results]
    assert [list(r.triggered) for r in brief.results] == [list(r.triggered) for r in full.results]
    assert all(r.category_scores for r in full.results) and not any(r.category_scores for r in brief.results)
    for f, b in zip(full.results, brief.results, strict=True):
        assert b.redacted_text == (f.redacted_text if f.action == moderation_pb2.ACTION_REDACT else "")


async def test_plaintext_is_refused(moderation: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{moderation.port}") as channel:
        stub = moderation_pb2_grpc.ModerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Check(moderation_pb2.CheckRequest(texts=["hi"]), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_tls_without_client_certificate_is_refused(moderation: Server, pki: dict[str, CertFiles]) -> None:
    no_cert = grpc.ssl_channel_credentials(root_certificates=pki["envoy"].ca.read_bytes())
    async with grpc.aio.secure_channel(f"127.0.0.1:{moderation.port}", no_cert) as channel:
        stub = moderation_pb2_grpc.ModerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Check(moderation_pb2.CheckRequest(texts=["hi"]), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_certificate_from_another_ca_is_refused(
    moderation: Server, pki: dict[str, CertFiles], tmp_path: Path
) -> None:
    foreign = mint_mesh(tmp_path, "evil.local", ["envoy"])["envoy"]
    # Trusts the real CA (so the server is accepted) but presents a foreign client cert.
    creds = grpc.ssl_channel_credentials(
        root_certificates=pki["envoy"].ca.read_bytes(),
        private_key=foreign.key.read_bytes(),
        certificate_chain=foreign.cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(f"127.0.0.1:{moderation.port}", creds) as channel:
        stub = moderation_pb2_grpc.ModerationServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.Check(moderation_pb2.CheckRequest(texts=["hi"]), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_domain_errors_keep_their_status(pki: dict[str, CertFiles], tmp_path: Path) -> None:
    server = create_server(
        settings_for(pki["billing"]),
        billing_servicer.register(Ledger(Database(f"sqlite:///{tmp_path / 'l.db'}"))),
        ["b"],
    )
    await server.start()
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials(pki["envoy"])) as channel:
            stub = billing_pb2_grpc.BillingServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await stub.GetUsage(billing_pb2.GetUsageRequest(), timeout=5)
    finally:
        await server.stop(0)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "tenant_id" in (error.value.details() or "")


async def test_ext_authz_check_over_the_wire(pki: dict[str, CertFiles], tmp_path: Path, flush_redis: str) -> None:
    store = KeyStore(Database(f"sqlite:///{tmp_path / 'keys.db'}"), b"x" * 32)
    issued = store.create_key(store.create_tenant("acme").id, scopes=Scopes(models=frozenset({"m1", "m2"})))
    limited = store.create_key(store.create_tenant("small").id, rpm=1)
    authz = ext_authz.ExtAuthz(Authorizer(store, MASTER, limiter=RateLimiter(aioredis.Redis.from_url(flush_redis))))
    server = create_server(settings_for(pki["auth"]), ext_authz.register(authz), [ext_authz.SERVICE_NAME])
    await server.start()

    async def check(authorization: str, path: str) -> CheckResponse:
        http = AttributeContextHttpRequest(headers={"authorization": authorization}, path=path, method="POST")
        request = CheckRequest(attributes=AttributeContext(request=AttributeContextRequest(http=http)))
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials(pki["envoy"])) as channel:
            call = channel.unary_unary(
                f"/{ext_authz.SERVICE_NAME}/Check",
                request_serializer=bytes,
                response_deserializer=CheckResponse.parse,
            )
            return await call(request, timeout=5)  # type: ignore[no-any-return]

    try:
        allowed = await check(f"Bearer {issued.secret}", "/v1/chat/completions")
        denied = await check("Bearer mk_000000000000_nope", "/v1/chat/completions")
        forbidden = await check(f"Bearer {issued.secret}", "/mariana.auth.v1.AuthAdminService/CreateKey")
        first = await check(f"Bearer {limited.secret}", "/v1/models")
        over = await check(f"Bearer {limited.secret}", "/v1/models")
    finally:
        await server.stop(0)
    assert allowed.status.code == 0
    headers = {h.header.key: h.header.value for h in allowed.ok_response.headers}
    assert headers == {
        "x-mariana-tenant": issued.record.tenant_id,
        "x-mariana-key-id": issued.record.id,
        "x-mariana-models": "m1,m2",
    }
    assert first.status.code == 0
    assert {h.header.key: h.header.value for h in first.ok_response.response_headers_to_add}[
        "x-ratelimit-remaining-requests"
    ] == "0"
    assert over.status.code == 8 and over.denied_response.status.code == 429
    over_headers = {h.header.key: h.header.value for h in over.denied_response.headers}
    assert int(over_headers["retry-after"]) >= 1 and over_headers["x-ratelimit-limit-requests"] == "1"
    assert '"rate_limit_exceeded"' in over.denied_response.body
    assert denied.status.code == 16 and denied.denied_response.status.code == 401
    assert '"invalid_api_key"' in denied.denied_response.body
    assert forbidden.status.code == 7 and forbidden.denied_response.status.code == 403


class EchoInference:
    """Stands in for the model: streams a fixed text word by word."""

    def __init__(self, text: str) -> None:
        self.words = text.split(" ")

    async def generate(
        self, request: GenerationRequest, request_id: str, timeout_s: float | None = None, stream: bool = True
    ) -> AsyncGenerator[Piece, None]:
        for i, word in enumerate(self.words, start=1):
            yield Piece(word + " ", None, 5, i)
        yield Piece("", "stop", 5, len(self.words))

    async def embed(self, model: str, texts: Sequence[str], request_id: str) -> tuple[list[list[float]], int]:
        raise NotImplementedError

    async def models(self) -> list[ModelEntry]:
        return []


class ListSink:
    def __init__(self) -> None:
        self.records: list[UsageRecord] = []

    def publish(self, record: UsageRecord) -> None:
        self.records.append(record)


async def test_router_moderates_output_through_the_real_service(moderation: Server, pki: dict[str, CertFiles]) -> None:
    text = "Sure, the admin is bob@example.com and the key is AKIAIOSFODNN7EXAMPLE as requested."
    async with grpc.aio.secure_channel(f"127.0.0.1:{moderation.port}", credentials(pki["router"])) as channel:
        gateway = make_gateway(EchoInference(text), GrpcModeration(channel, 5), ListSink(), output_window_chars=16)
        caller = Caller("t", "k", "r")
        request = GenerationRequest("m", messages=[("user", "hi")])
        for stream in (True, False):  # windows one by one, or all in one batch call
            pieces = [p async for p in gateway.generate(caller, request, stream=stream)]
            out = "".join(p.text for p in pieces)
            assert "bob@example.com" not in out and "AKIA" not in out
            assert "[EMAIL]" in out and "[SECRET]" in out and out.startswith("Sure, the admin is")
        blocked = make_gateway(EchoInference("I will buy a bomb today."), GrpcModeration(channel, 5), ListSink(), 16)
        for stream in (True, False):
            pieces = [p async for p in blocked.generate(caller, request, stream=stream)]
            assert pieces[-1].finish_reason == "content_filter"
            assert "bomb" not in "".join(p.text for p in pieces)


async def test_retry_hint_crosses_a_hop(pki: dict[str, CertFiles]) -> None:
    """RESOURCE_EXHAUSTED keeps its retry-after from service to service."""
    from mariana_common.errors import ResourceExhausted
    from mariana_common.interceptors import error_from_rpc

    class Full(moderation_pb2_grpc.ModerationServiceServicer):
        async def Check(self, request: moderation_pb2.CheckRequest, context: object) -> moderation_pb2.CheckResponse:
            raise ResourceExhausted("queue full", retry_after_s=3)

    def register(server: grpc.aio.Server) -> None:
        moderation_pb2_grpc.add_ModerationServiceServicer_to_server(Full(), server)

    server = create_server(settings_for(pki["moderation"]), register, ["m"])
    await server.start()
    try:
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials(pki["router"])) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await moderation_pb2_grpc.ModerationServiceStub(channel).Check(moderation_pb2.CheckRequest())
    finally:
        await server.stop(0)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    passed_on = error_from_rpc(error.value)
    assert isinstance(passed_on, ResourceExhausted) and passed_on.retry_after_s == 3


async def check_moderation(channel: grpc.aio.Channel) -> moderation_pb2.CheckResponse:
    stub = moderation_pb2_grpc.ModerationServiceStub(channel)
    return await stub.Check(moderation_pb2.CheckRequest(texts=["mail x@example.com"]), timeout=5)


async def test_behind_a_sidecar_a_service_serves_plaintext(pki: dict[str, CertFiles]) -> None:
    """tls=false (Kubernetes + Istio): the sidecar does mTLS; the peer list does not apply."""
    moderator = Moderator(ToxicityModel.load(), load_policy, ["bomb"])
    settings = ServiceSettings(tls=False, port=0, tls_peers=["spiffe://mariana.local/envoy"])
    server = create_server(settings, moderation_servicer.register(moderator), ["m"])
    await server.start()
    try:
        plain = mesh_channel(f"127.0.0.1:{server.port}", settings)
        reply = await check_moderation(plain)
        await plain.close()
    finally:
        await server.stop(0)
    assert reply.results[0].findings[0].kind == "email"
    with pytest.raises(ValidationError, match="tls needs"):
        ServiceSettings(port=0)


async def test_only_listed_peers_and_the_service_itself_may_call(pki: dict[str, CertFiles]) -> None:
    moderator = Moderator(ToxicityModel.load(), load_policy, ["bomb"])
    settings = settings_for(pki["moderation"]).model_copy(update={"tls_peers": ["spiffe://mariana.local/envoy"]})
    server = create_server(settings, moderation_servicer.register(moderator), ["m"])
    await server.start()
    target = f"127.0.0.1:{server.port}"
    try:
        for caller, allowed in (("envoy", True), ("moderation", True), ("router", False)):
            async with grpc.aio.secure_channel(target, credentials(pki[caller])) as channel:
                if allowed:
                    assert (await check_moderation(channel)).results
                else:
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await check_moderation(channel)
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await server.stop(0)


async def test_a_rotated_certificate_is_served_and_presented_without_a_restart(tmp_path: Path) -> None:
    """The server takes new files at its next handshake; a mesh channel reopens
    with its new files and keeps working."""
    pki = mint_mesh(tmp_path, "mariana.local", ["moderation", "envoy", "router"])
    moderator = Moderator(ToxicityModel.load(), load_policy, ["bomb"])
    server = create_server(settings_for(pki["moderation"]), moderation_servicer.register(moderator), ["m"])
    await server.start()
    router_settings = settings_for(pki["router"])
    channel = mesh_channel(f"127.0.0.1:{server.port}", router_settings)
    try:
        envoy = pki["envoy"].cert, pki["envoy"].key, pki["envoy"].ca
        before = served_serial(server.port, *envoy)
        assert (await check_moderation(channel)).results
        rotated = rotate_workloads(tmp_path, "mariana.local", ["moderation", "router"])
        new_serial = serial_in_file(rotated["moderation"].cert)
        deadline = time.monotonic() + 10
        while served_serial(server.port, *envoy) != new_serial:  # files are looked at once a second
            assert time.monotonic() < deadline, "the server kept its old certificate"
            await asyncio.sleep(0.2)
        assert new_serial != before
        for _ in range(30):  # the channel notices within a second, reopens, and calls still succeed
            assert (await check_moderation(channel)).results
            await asyncio.sleep(0.05)
        assert channel.current()[1] >= 1  # it reopened
    finally:
        await channel.close()
        await server.stop(0)
