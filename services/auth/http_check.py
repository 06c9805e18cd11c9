"""Envoy's ext_authz over plain HTTP/1.1 (`http_service`), the edge's check on
every request.

Envoy sends the request's method and path (after `path_prefix`) with the
headers it is told to forward and no body; a 200 admits the request (the
identity headers go to the router, the rate-limit headers to the client), any
other status is the denial Envoy sends the client as it is. A grpc.aio server
spends ~0.25 ms of CPU on a call before any logic; this server, an
asyncio.Protocol over uvloop with a parser for the one client it has, a few
tens of µs (`python -m bench.gateway_overhead` measures the difference).

Only peers the settings list may connect (mTLS; behind a sidecar the mesh's
AuthorizationPolicy decides instead). Requests on one connection are answered
in order; Envoy's HTTP/1.1 pool sends one at a time."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import cast

import structlog

from mariana_common.http1_wire import HEALTH_PATH
from mariana_common.interceptors import trace_id_from
from mariana_common.metrics import observe_call
from mariana_common.tls import ServerSslContext, uri_names_of_der
from mariana_common.tracing import server_span
from services.auth.authorizer import Verdict
from services.auth.ext_authz import IDENTITY_HEADERS, ExtAuthz, denial_of, is_grpc

log = structlog.get_logger()

MAX_HEAD_BYTES = 32 * 1024
ACCEPT_BACKLOG = 4096
CHECK_PATH_PREFIX = "/check"
# What the edge forwards to the check (besides method, path and host).
FORWARDED_HEADERS = ("authorization", "x-request-id", "traceparent")
# The checked request's content-type (to shape a denial for gRPC or JSON),
# under a name of its own: see mesh/envoy_edge.py.
CALLER_CONTENT_TYPE = "x-mariana-caller-content-type"


class Head:
    __slots__ = ("headers", "keep_alive", "method", "path", "target")

    def __init__(self, method: str, target: str, headers: dict[str, str], keep_alive: bool) -> None:
        self.method = method
        self.target = target
        # the checked request's path: what follows the prefix
        self.path = target[len(CHECK_PATH_PREFIX) :] if target.startswith(CHECK_PATH_PREFIX) else target
        self.headers = headers
        self.keep_alive = keep_alive


class BadRequest(ValueError):
    pass


def parse_head(raw: bytes) -> Head:
    """One request head (without the blank line). Header names lower-cased;
    a repeated header keeps its first value (Envoy sends each once)."""
    try:
        text = raw.decode("latin-1")
        request_line, *lines = text.split("\r\n")
        method, target, version = request_line.split(" ")
    except ValueError as error:
        raise BadRequest("malformed request line") from error
    if not version.startswith("HTTP/1."):
        raise BadRequest(f"unsupported protocol {version!r}")
    headers: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadRequest("malformed header line")
        headers.setdefault(name.lower(), value.strip())
    if "transfer-encoding" in headers:
        raise BadRequest("a check request has no body")
    try:
        if int(headers.get("content-length", "0")) != 0:
            raise BadRequest("a check request has no body")
    except ValueError as error:
        raise BadRequest("bad content-length") from error
    closing = headers.get("connection", "").lower() == "close" or version == "HTTP/1.0"
    return Head(method, target, headers, keep_alive=not closing)


def response(status: int, reason: str, headers: dict[str, str] | list[tuple[str, str]], body: bytes = b"") -> bytes:
    items = headers.items() if isinstance(headers, dict) else headers
    lines = [f"HTTP/1.1 {status} {reason}", f"content-length: {len(body)}", *(f"{k}: {v}" for k, v in items)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


Decide = Callable[[Head], Awaitable[bytes]]
BAD_REQUEST = response(400, "Bad Request", {"connection": "close"})
FAILED = response(
    503,
    "Service Unavailable",
    {"content-type": "application/json", "retry-after": "1"},
    b'{"error": {"message": "the auth check failed; retry shortly", "type": "server_error", "param": null, '
    b'"code": "unavailable"}}',
)
HEALTHY = response(200, "OK", {})
DRAINING = response(503, "Service Unavailable", {})


@functools.lru_cache(maxsize=4096)
def _identity_lines(tenant_id: str, key_id: str, models: str) -> list[tuple[str, str]]:
    return list(zip(IDENTITY_HEADERS, (tenant_id, key_id, models), strict=True))


def answer(decision: Verdict | Exception, content_type: str) -> bytes:
    """200 with the identity (for the router) and rate-limit headers (for the
    client); or the denial."""
    if isinstance(decision, Verdict):
        identity = decision.identity
        lines = _identity_lines(identity.tenant_id, identity.key_id, ",".join(sorted(identity.scopes.models)))
        return response(200, "OK", lines + list(decision.rate.headers.items()))
    denial = denial_of(decision, is_grpc(content_type))
    return response(denial.http.value, denial.http.phrase, denial.headers, denial.body.encode())


def decider(authz: ExtAuthz) -> Decide:
    async def decide(head: Head) -> bytes:
        headers = head.headers
        structlog.contextvars.bind_contextvars(trace_id=trace_id_from(headers.items()), rpc=CHECK_PATH_PREFIX)
        started = time.perf_counter()
        with server_span(f"{head.method} {CHECK_PATH_PREFIX}", headers, {"http.target": head.path}):
            decision = await authz.decide(headers.get("authorization", ""), head.path, headers.get("x-request-id"))
        observe_call(CHECK_PATH_PREFIX, "OK", time.perf_counter() - started)
        return answer(decision, headers.get(CALLER_CONTENT_TYPE, ""))

    return decide


class CheckServer:
    """What every connection shares: the decision, who may connect, and
    whether the server is serving (its health) or draining."""

    def __init__(self, decide: Decide, peers: frozenset[str]) -> None:
        self.decide = decide
        self.peers = peers
        self.serving = True
        self._rotation: asyncio.Task[None] | None = None

    async def answer(self, head: Head) -> bytes:
        if head.target == HEALTH_PATH:
            return HEALTHY if self.serving else DRAINING
        return await self.decide(head)

    async def start(self, host: str, port: int, tls: ServerSslContext | None) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: CheckConnection(self),
            host,
            port,
            ssl=tls.context if tls else None,
            reuse_address=True,
            # Envoy opens a connection per concurrent check (HTTP/1.1): a burst
            # opens hundreds at once, more than asyncio's default queue of 100.
            backlog=ACCEPT_BACKLOG,
        )
        if tls is not None:
            self._rotation = loop.create_task(tls.follow_rotation())
        return server


class CheckConnection(asyncio.Protocol):
    def __init__(self, server: CheckServer) -> None:
        self._server = server
        self._buffer = b""
        self._transport: asyncio.Transport | None = None
        self._queue: list[Head] = []
        self._busy: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        peers = self._server.peers
        if peers:
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            names = uri_names_of_der(der) if der else frozenset()
            if peers.isdisjoint(names):
                log.warning("check caller refused", peer=sorted(names))
                transport.close()

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while True:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > MAX_HEAD_BYTES:
                    self._fail()
                return
            raw, self._buffer = self._buffer[:end], self._buffer[end + 4 :]
            try:
                self._queue.append(parse_head(raw))
            except BadRequest as error:
                log.warning("bad check request", error=str(error))
                self._fail()
                return
            if self._busy is None:
                self._busy = asyncio.get_running_loop().create_task(self._answer_all())

    def _fail(self) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(BAD_REQUEST)
            self._transport.close()

    async def _answer_all(self) -> None:
        try:
            while self._queue and self._transport is not None and not self._transport.is_closing():
                head = self._queue.pop(0)
                try:
                    answer = await self._server.answer(head)
                except Exception:  # a bug: deny, do not hang Envoy's request
                    log.exception("check failed", path=head.path)
                    answer = FAILED
                if self._transport is None:  # Envoy gave up on it (its timeout) and closed the connection
                    return
                self._transport.write(answer)
                if not head.keep_alive:
                    self._transport.close()
        finally:
            self._busy = None

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._queue.clear()
