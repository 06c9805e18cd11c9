"""auth's HTTP check server (what Envoy's ext_authz `http_service` calls), on a
real port with the platform's mTLS, a real key store and Redis rate limits,
called the way Envoy calls it: HTTP/1.1 requests on a kept-alive connection."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from mariana_common.server import allowed_peers
from mariana_common.settings import ServiceSettings
from mariana_common.sql import Database
from mariana_common.tls import ServerSslContext
from mesh.pki import CertFiles, mint_mesh, rotate_workloads
from mesh.plan import free_port
from services.auth.authorizer import Authorizer
from services.auth.ext_authz import ExtAuthz
from services.auth.http_check import CALLER_CONTENT_TYPE, CheckServer, decider
from services.auth.rate_limit import RateLimiter
from services.auth.store import IssuedKey, KeyStore, Scopes
from tests.tls_probe import serial_in_file, served_serial

MASTER = "sk-integration-master-key"
TRUST_DOMAIN = "mariana.local"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


def client_context(certs: CertFiles) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.cert), str(certs.key))
    return context


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *lines = head.strip().split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(int(status_line.split(" ")[1]), headers, body)


def check_request(path: str, authorization: str | None, content_type: str = "application/json") -> bytes:
    """As Envoy sends it: the checked request's content-type under its own name."""
    lines = [f"POST /check{path} HTTP/1.1", "host: auth", "content-length: 0", f"{CALLER_CONTENT_TYPE}: {content_type}"]
    if authorization is not None:
        lines.append(f"authorization: {authorization}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@dataclass
class Checker:
    port: int
    tenant_key: IssuedKey
    limited_key: IssuedKey

    async def exchange(self, certs: CertFiles, *requests: bytes) -> list[Reply]:
        """All requests written at once (pipelined), the replies read in order."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.port, ssl=client_context(certs), server_hostname="localhost"
        )
        try:
            writer.write(b"".join(requests))
            return [await asyncio.wait_for(read_reply(reader), 5) for _ in requests]
        finally:
            writer.close()


async def start_checker(pki: dict[str, CertFiles], tmp_path: Path, redis_url: str) -> tuple[asyncio.Server, Checker]:
    store = KeyStore(Database(f"sqlite:///{tmp_path / 'keys.db'}"), b"x" * 32)
    issued = store.create_key(store.create_tenant("acme").id, scopes=Scopes(models=frozenset({"m2", "m1"})))
    limited = store.create_key(store.create_tenant("small").id, rpm=1)
    authorizer = Authorizer(store, MASTER, limiter=RateLimiter(aioredis.Redis.from_url(redis_url)))
    auth = pki["auth"]
    settings = ServiceSettings(
        tls_cert=auth.cert, tls_key=auth.key, tls_ca=auth.ca, tls_peers=[f"spiffe://{TRUST_DOMAIN}/envoy"]
    )
    port = free_port()
    check = CheckServer(decider(ExtAuthz(authorizer)), allowed_peers(settings))
    server = await check.start("127.0.0.1", port, ServerSslContext(auth.cert, auth.key, auth.ca))
    return server, Checker(port, issued, limited)


@pytest.fixture
async def checker(pki: dict[str, CertFiles], tmp_path: Path, flush_redis: str) -> AsyncIterator[Checker]:
    server, checker = await start_checker(pki, tmp_path, flush_redis)
    yield checker
    server.close()


async def test_an_admitted_request_gets_its_identity_and_rate_headers(
    checker: Checker, pki: dict[str, CertFiles]
) -> None:
    (reply,) = await checker.exchange(
        pki["envoy"], check_request("/v1/chat/completions", f"Bearer {checker.tenant_key.secret}")
    )
    assert reply.status == 200 and reply.body == b""
    record = checker.tenant_key.record
    assert reply.headers["x-mariana-tenant"] == record.tenant_id
    assert reply.headers["x-mariana-key-id"] == record.id
    assert reply.headers["x-mariana-models"] == "m1,m2"


async def test_denials_carry_status_openai_error_and_grpc_status_for_grpc_callers(
    checker: Checker, pki: dict[str, CertFiles]
) -> None:
    limited = f"Bearer {checker.limited_key.secret}"
    tenant = f"Bearer {checker.tenant_key.secret}"
    replies = await checker.exchange(
        pki["envoy"],
        check_request("/v1/models", None),
        check_request("/v1/models", "Bearer mk_000000000000_nope"),
        check_request("/mariana.auth.v1.AuthAdminService/CreateKey", tenant, "application/grpc"),
        check_request("/v1/models", limited),
        check_request("/v1/models", limited),
        check_request("/mariana.llm.v1.LlmService/ListModels", limited, "application/grpc"),
    )
    missing, unknown, forbidden, first, over, over_grpc = replies
    assert [r.status for r in replies] == [401, 401, 403, 200, 429, 429]
    assert json.loads(unknown.body)["error"]["code"] == "invalid_api_key"
    assert json.loads(missing.body)["error"]["message"] == "expected 'Authorization: Bearer <API key>'"
    assert json.loads(forbidden.body)["error"]["type"] == "permission_error"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    assert json.loads(over.body)["error"]["code"] == "rate_limit_exceeded"
    assert int(over.headers["retry-after"]) >= 1 and over.headers["x-ratelimit-limit-requests"] == "1"
    assert "grpc-status" not in over.headers
    assert over_grpc.headers["grpc-status"] == "8"  # RESOURCE_EXHAUSTED, not the UNAVAILABLE Envoy maps 429 to
    assert all(r.headers["content-type"] == "application/json" for r in replies if r.status != 200)


async def test_health_and_a_malformed_request(checker: Checker, pki: dict[str, CertFiles]) -> None:
    (health,) = await checker.exchange(pki["envoy"], b"GET /healthz HTTP/1.1\r\nhost: auth\r\n\r\n")
    assert health.status == 200
    (bad,) = await checker.exchange(pki["envoy"], b"POST /check/v1/models HTTP/1.1\r\ncontent-length: 5\r\n\r\nhello")
    assert bad.status == 400 and bad.headers["connection"] == "close"


async def test_only_listed_peers_may_connect(checker: Checker, pki: dict[str, CertFiles]) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", checker.port, ssl=client_context(pki["intruder"]), server_hostname="localhost"
    )
    writer.write(check_request("/v1/models", f"Bearer {checker.tenant_key.secret}"))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed, nothing answered
    writer.close()


async def test_a_rotated_certificate_is_served_at_the_next_handshake(tmp_path: Path, flush_redis: str) -> None:
    pki = mint_mesh(tmp_path / "pki", TRUST_DOMAIN, ["envoy", "auth"])
    server, checker = await start_checker(pki, tmp_path, flush_redis)
    envoy = pki["envoy"]
    try:
        before = await asyncio.to_thread(served_serial, checker.port, envoy.cert, envoy.key, envoy.ca)
        rotate_workloads(tmp_path / "pki", TRUST_DOMAIN, ["auth"])
        rotated = serial_in_file(pki["auth"].cert)
        deadline = time.monotonic() + 10
        while (
            served := await asyncio.to_thread(served_serial, checker.port, envoy.cert, envoy.key, envoy.ca)
        ) != rotated:
            assert time.monotonic() < deadline, "the rotated certificate was not taken up"
            await asyncio.sleep(0.2)
        (reply,) = await checker.exchange(envoy, check_request("/v1/models", f"Bearer {checker.tenant_key.secret}"))
    finally:
        server.close()
    assert before != served == rotated
    assert reply.status == 200
