"""Real servers on ephemeral ports with the platform's mTLS, called with real
gRPC clients: what each service refuses, and how statuses reach clients."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
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
from redis.exceptions import RedisError

from launcher.readiness import port_open, wait_until
from mariana.billing.v1 import billing_pb2, billing_pb2_grpc
from mariana.moderation.v1 import moderation_pb2, moderation_pb2_grpc
from mariana_common.channels import mesh_channel
from mariana_common.redis_client import redis_client
from mariana_common.server import Server, create_server
from mariana_common.settings import ServiceSettings
from mariana_common.sql import Database
from mariana_common.tls import channel_credentials
from mesh.pki import CertFiles, mint_mesh, rotate_workloads
from mesh.plan import free_port
from services.auth import ext_authz
from services.auth.authorizer import Authorizer
from services.auth.rate_limit import RateLimiter
from services.auth.store import KeyStore, Scopes
from services.billing import servicer as billing_servicer
from services.billing.consumer import CONSUMER_FAILURES, DEAD_LETTER_SUFFIX, UsageConsumer
from services.billing.events import decode
from services.billing.ledger import Entry, Ledger
from services.billing.prices import load_prices
from services.billing.reservations import Reservations, tenant_scope
from services.moderation import servicer as moderation_servicer
from services.moderation.moderator import Moderator
from services.moderation.policy import load_policy
from services.moderation.toxicity import ToxicityModel
from services.router.domain import Caller, GenerationRequest, ModelEntry, Piece, UsageRecord
from services.router.spool import Spool
from services.router.tests.test_gateway import make_gateway
from services.router.upstreams import GrpcModeration
from services.router.usage import RedisUsagePublisher
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


def usage(request_id: str, completion: int = 3) -> UsageRecord:
    return UsageRecord(request_id, "tenant-a", "key-a", "m", 10, completion, "stop", 1.0)


def publisher_for(client: aioredis.Redis, tmp_path: Path) -> RedisUsagePublisher:
    return RedisUsagePublisher(client, "usage", Reservations(client), Spool(tmp_path / "spool.jsonl"), retry_s=0.1)


async def test_usage_publisher_reloads_a_script_redis_lost_without_doubling_events(
    flush_redis: str, tmp_path: Path
) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    reservations = Reservations(client)
    for i in range(3):
        await reservations.reserve(f"s{i}", "tenant-a", "key-a", 100, 50, 60_000, [])
    await client.script_flush()  # as after a Redis restart
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(3):
        publisher.publish(replace(usage(f"s{i}"), settle_micros=10))
    await publisher.close(5)
    assert await client.xlen("usage") == 3
    assert (await reservations.scope("tenant-a"))["reserved"] == 3 * 10  # each settled to its real cost
    await client.aclose()


async def test_usage_is_spooled_to_disk_while_redis_is_away_and_replayed_in_order(tmp_path: Path) -> None:
    port = free_port()

    def redis_server() -> subprocess.Popen[bytes]:
        argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        server = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        wait_until(port_open(port), "redis", time.monotonic() + 10, None)
        return server

    async def stream_ids() -> list[str]:
        return [decode(fields).request_id for _, fields in await client.xrange("usage")]

    async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
        for _ in range(200):
            try:
                if await check():
                    return
            except RedisError:  # the test's own pooled connection to the Redis that was killed
                pass
            await asyncio.sleep(0.05)
        raise AssertionError("timed out")

    server = redis_server()
    client = redis_client(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    spool_file = tmp_path / "spool.jsonl"
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    try:
        publisher.publish(usage("before"))

        async def sent_before() -> bool:
            return await stream_ids() == ["before"]

        await eventually(sent_before)
        server.kill()
        server.wait()
        during = [f"during-{i}" for i in range(5)]
        for request_id in during:
            publisher.publish(usage(request_id))
            await asyncio.sleep(0.05)

        async def all_spooled() -> bool:
            return publisher.spool_depth == len(during)

        await eventually(all_spooled)
        # On disk, in order: a router that died now would replay them at start.
        assert [i.request_id for i in Spool(spool_file).read() if not isinstance(i, str)] == during
        server = redis_server()  # back, empty (no persistence here)
        publisher.publish(usage("after"))

        async def replayed() -> bool:
            return await stream_ids() == [*during, "after"]

        await eventually(replayed)

        async def spool_emptied() -> bool:  # the publisher clears it once the replay's round trip returns
            return publisher.spool_depth == 0

        await eventually(spool_emptied)
        assert Spool(spool_file).read() == []
    finally:
        await publisher.close(2)
        await client.aclose()
        server.kill()
        server.wait()


async def test_usage_flows_from_publisher_to_ledger_exactly_once(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(50):
        publisher.publish(usage(f"r{i}"))
    publisher.publish(usage("r7", completion=999))  # a redelivered duplicate
    await publisher.close(5)
    await client.xadd("usage", {b"event": b"\xff garbage"})

    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    consumer = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    for _ in range(100):
        if len(ledger.entries("tenant-a")) == 50 and await client.xlen("usage" + DEAD_LETTER_SUFFIX) == 1:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    entries = ledger.entries("tenant-a")
    assert len(entries) == 50
    assert {e.request_id: e.completion_tokens for e in entries}["r7"] == 3
    assert await client.xlen("usage" + DEAD_LETTER_SUFFIX) == 1
    pending = await client.xpending("usage", "billing")
    assert pending["pending"] == 0
    await client.aclose()


async def test_applied_usage_turns_reservations_into_spend_once(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    reservations = Reservations(client)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    ledger.record([Entry("old", "tenant-a", "key-a", "m", 1, 1, "stop", 1.0, 700)])  # spend from before
    ledger.set_budget("tenant-a", 10_000, 0)
    consumer = UsageConsumer(
        client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50, reservations=reservations
    )
    await consumer.sync_admission_state()  # as at start: Redis learns the ledger's spend and limits
    assert (await reservations.scope("tenant-a"))["spent"] == 700
    assert (await reservations.scope("tenant-a"))["hard"] == 10_000
    for i in range(3):
        assert await reservations.reserve(f"q{i}", "tenant-a", "key-a", 1000, 50, 60_000, []) is None
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(3):
        publisher.publish(replace(usage(f"q{i}"), settle_micros=1))
    publisher.publish(replace(usage("q0"), settle_micros=1))  # a duplicate changes nothing
    await publisher.close(5)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    for _ in range(100):
        if (await reservations.scope("tenant-a")).get("reserved", -1) == 0:
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    cost = sum(e.cost_micros for e in ledger.entries("tenant-a"))
    scope = await reservations.scope("tenant-a")
    assert (scope["spent"], scope["reserved"]) == (cost, 0)
    assert len(ledger.entries("tenant-a")) == 4
    await client.aclose()


async def test_the_consumer_outlives_a_batch_that_fails_and_applies_it_later(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    reservations = Reservations(client)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    consumer = UsageConsumer(
        client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50, reservations=reservations
    )
    # The tenant's budget counters are unusable (here: the wrong Redis type), so applying fails.
    await client.set(tenant_scope("tenant-a"), "not a hash")
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    publisher.publish(usage("r1"))
    await publisher.close(5)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    for _ in range(100):
        if CONSUMER_FAILURES._value.get() >= 1:
            break
        await asyncio.sleep(0.05)
    failures = CONSUMER_FAILURES._value.get()
    assert failures >= 1 and not task.done()
    await client.delete(tenant_scope("tenant-a"))  # repaired: the retry goes through
    for _ in range(100):
        if (await client.xpending("usage", "billing"))["pending"] == 0 and await reservations.scope("tenant-a"):
            break
        await asyncio.sleep(0.05)
    stop.set()
    await task
    assert [e.request_id for e in ledger.entries("tenant-a")] == ["r1"]
    assert (await reservations.scope("tenant-a"))["spent"] == ledger.entries("tenant-a")[0].cost_micros
    assert (await client.xpending("usage", "billing"))["pending"] == 0
    await client.aclose()


async def test_the_consumer_stops_when_asked_while_redis_is_gone(tmp_path: Path) -> None:
    port = free_port()
    args = ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(tmp_path)]
    server = await asyncio.create_subprocess_exec("redis-server", *args, stdout=subprocess.DEVNULL)
    await asyncio.to_thread(wait_until, port_open(port), "redis", time.monotonic() + 10)
    client = redis_client(f"redis://127.0.0.1:{port}/0", timeout_s=0.5)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    consumer = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50)
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    await asyncio.sleep(0.3)
    server.kill()  # gone for good, as when the whole platform stops
    await server.wait()
    await asyncio.sleep(1.5)  # the consumer retries meanwhile
    stop.set()
    await asyncio.wait_for(task, 5)
    await client.aclose()


async def test_acknowledged_usage_is_trimmed_from_the_stream_and_nothing_else(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    consumer = UsageConsumer(
        client, Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}")), load_prices(), "usage", "billing", "c1"
    )
    await consumer.ensure_group()
    assert await consumer.trim() == 0  # nothing read yet: nothing goes
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(30):
        publisher.publish(usage(f"r{i}"))
    await publisher.close(5)
    stop = asyncio.Event()
    stop.set()
    await consumer.run(stop)  # nothing pending to replay: returns at once
    # Another consumer reads 10 and "crashes" before acknowledging; 20 are never read.
    await client.xreadgroup("billing", "gone", {"usage": ">"}, count=10)
    assert await consumer.trim() == 0
    unread = await client.xrange("usage")
    # Now the first 10 are applied and acknowledged (reclaimed from the gone consumer).
    claimed = await client.xautoclaim("usage", "billing", "c1", 0, start_id="0-0", count=10)
    await consumer.apply(claimed[1])
    assert await consumer.trim() == 10
    assert await client.xrange("usage") == unread[10:]
    pending = await client.xpending("usage", "billing")
    assert pending["pending"] == 0
    await client.aclose()


async def test_unacknowledged_entries_are_applied_after_a_restart(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    consumer = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "c1", block_ms=50)
    await consumer.ensure_group()
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    publisher.publish(usage("crash-1"))
    await publisher.close(5)
    # A consumer read the entry, then "crashed" before recording or acking it.
    await client.xreadgroup("billing", "c1", {"usage": ">"}, count=10)
    assert ledger.entries("tenant-a") == []
    stop = asyncio.Event()
    stop.set()  # drain the pending entries, then stop
    await consumer.run(stop)
    assert [e.request_id for e in ledger.entries("tenant-a")] == ["crash-1"]
    await client.aclose()


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


async def test_entries_of_a_consumer_that_never_returns_are_reclaimed(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    survivor = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "survivor", reclaim_idle_ms=0)
    await survivor.ensure_group()
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(5):
        publisher.publish(usage(f"orphan-{i}"))
    await publisher.close(5)
    await client.xreadgroup("billing", "crashed-replica", {"usage": ">"}, count=10)  # read, never acked
    assert await survivor.reclaim() == 5
    assert sorted(e.request_id for e in ledger.entries("tenant-a")) == [f"orphan-{i}" for i in range(5)]
    assert (await client.xpending("usage", "billing"))["pending"] == 0
    await client.aclose()


async def test_crossing_a_soft_budget_emits_one_alert(flush_redis: str, tmp_path: Path) -> None:
    client = aioredis.Redis.from_url(flush_redis)
    ledger = Ledger(Database(f"sqlite:///{tmp_path / 'ledger.db'}"))
    ledger.set_budget("tenant-a", hard_limit_micros=0, soft_limit_micros=15)
    consumer = UsageConsumer(client, ledger, load_prices(), "usage", "billing", "c1", alerts_stream="alerts")
    await consumer.ensure_group()
    publisher = publisher_for(client, tmp_path)
    publisher.start()
    for i in range(4):  # 10 prompt + 3 completion tokens at the default price: 16 micro-units each
        publisher.publish(usage(f"spend-{i}"))
    await publisher.close(5)
    while pending := await client.xreadgroup("billing", "c1", {"usage": ">"}, count=1):
        await consumer.apply(list(pending[0][1]))
    alerts = await client.xrange("alerts")
    assert len(alerts) == 1
    fields = alerts[0][1]
    assert fields[b"tenant_id"] == b"tenant-a" and fields[b"kind"] == b"soft_budget"
    assert int(fields[b"spent_micros"]) >= 15
    await client.aclose()


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
