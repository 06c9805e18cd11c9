"""A service's gRPC methods served over HTTP/1.1, for Envoy's connections to
it in the local mesh.

Envoy speaks HTTP/1.1 upstream with trailers on (`enable_trailers`): a call
arrives as `POST /<service>/<method>` with its gRPC message in a chunked body
and its metadata as headers; the answer is the message (or, streaming, one
chunk per message) with `grpc-status` in the chunked trailers, or in the
headers alone when a call fails before it answered anything (gRPC's
"trailers-only", which Envoy's retries read). Envoy turns it back into h2
gRPC for the caller, so callers, retries, outlier detection and the edge's
transcoder see the same calls as from the grpc.aio server.

Why: a grpc.aio server spends ~0.25 ms of CPU and ~9 thread switches per call
before any logic (gRPC's poller, then the event loop for each of the call's
three completions). This server is an asyncio.Protocol on the event loop's
thread: one wake-up for the request, one write for a unary answer (measured
in session 12 on a scratch Envoy: 0.07-0.09 against 0.27-0.36 ms of server
CPU per call, p50 0.15 ms lower per hop).

It runs the same handlers as the grpc.aio server, wrapped by the same
`ErrorStatusInterceptor` (statuses, the caller's identity, metrics, trace
ids), and serves only unary and server-streaming methods, all the services
have. The grpc.aio server keeps serving on its own port (direct callers,
health probes, Kubernetes, where Istio's sidecars speak h2)."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, cast
from urllib.parse import quote

import grpc
import structlog

from mariana_common.http1_wire import HEALTH_PATH, chunk, frame, parse_message, unframe
from mariana_common.interceptors import ErrorStatusInterceptor
from mariana_common.tls import ServerSslContext, uri_names_of_der
from mariana_common.tracing import server_span

log = structlog.get_logger()

# A request larger than the mesh listener would pass on (mesh/envoy_config.py).
MAX_REQUEST_BYTES = 64 * 1024 * 1024
ACCEPT_BACKLOG = 4096
# Headers of the HTTP exchange, not the call's metadata.
_NOT_METADATA = frozenset(
    {"content-type", "content-length", "transfer-encoding", "te", "host", "connection", "grpc-timeout", "keep-alive"}
)
_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# gRPC percent-encodes a status message outside printable ASCII, and '%'.
_MESSAGE_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")
_HEALTHY = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
_DRAINING = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"
_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class Handlers:
    """Collects what generated `add_*Servicer_to_server` functions register,
    by full method name (`/package.Service/Method`)."""

    def __init__(self) -> None:
        self.by_method: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        """Generated code registers each service twice; the other way is kept."""

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        for name, handler in handlers.items():
            self.by_method[f"/{service}/{name}"] = handler


def grpc_timeout_s(value: str) -> float | None:
    """gRPC's `grpc-timeout` (digits and a unit) in seconds; None if malformed."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    if unit is None or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * unit


def metadata_of(headers: Mapping[str, str]) -> tuple[tuple[str, str | bytes], ...]:
    """The call's metadata as grpc.aio gives it: `-bin` values decoded."""
    items: list[tuple[str, str | bytes]] = []
    for name, value in headers.items():
        if name in _NOT_METADATA or name.startswith(":"):
            continue
        if name.endswith("-bin"):
            items.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
        else:
            items.append((name, value))
    return tuple(items)


def header_lines(metadata: Iterable[tuple[str, str | bytes]]) -> bytes:
    lines = []
    for name, value in metadata:
        if isinstance(value, bytes):
            value = base64.b64encode(value).decode().rstrip("=")
        lines.append(f"{name}: {value}\r\n")
    return "".join(lines).encode("latin-1")


def status_lines(code: grpc.StatusCode, details: str, trailers: Sequence[tuple[str, str | bytes]]) -> bytes:
    head = f"grpc-status: {code.value[0]}\r\n"
    if details:
        head += f"grpc-message: {quote(details, safe=_MESSAGE_SAFE)}\r\n"
    return head.encode() + header_lines(trailers)


class Call:
    """The servicer context of one call: what the services' handlers and the
    interceptor use of grpc.aio's, over this HTTP/1.1 exchange."""

    def __init__(
        self,
        connection: _Connection,
        method: str,
        metadata: tuple[tuple[str, str | bytes], ...],
        deadline: float | None,
    ) -> None:
        self._connection = connection
        self.method = method
        self._metadata = metadata
        self.deadline = deadline
        self._code: grpc.StatusCode | None = None
        self.details = ""
        self._initial: list[tuple[str, str | bytes]] = []
        self._trailing: list[tuple[str, str | bytes]] = []
        self.head_sent = False
        self.cancelled_by: str | None = None

    # -- grpc.aio.ServicerContext, as far as the services use it
    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def time_remaining(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def cancelled(self) -> bool:
        return self.cancelled_by is not None

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def peer(self) -> str:
        return self._connection.peer

    def peer_identities(self) -> list[bytes] | None:
        return self._connection.identities or None

    def set_trailing_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._trailing = list(metadata)

    async def send_initial_metadata(self, metadata: Sequence[tuple[str, str | bytes]]) -> None:
        self._initial.extend(metadata)
        self._connection.write(self.head())

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Sequence[tuple[str, str | bytes]] = ()
    ) -> None:
        self._code, self.details = code, details
        self._trailing.extend(trailing_metadata)
        raise grpc.aio.AbortError(details)

    # -- the answer
    def head(self) -> bytes:
        """The answer's head, once: later calls give nothing."""
        if self.head_sent:
            return b""
        self.head_sent = True
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n"
            + header_lines(self._initial)
            + b"\r\n"
        )

    def end(self, code: grpc.StatusCode | None = None, details: str = "") -> bytes:
        """The status: chunked trailers after a head, else trailers-only."""
        if code is None:
            code, details = self._code or grpc.StatusCode.OK, self.details
        status = status_lines(code, details, self._trailing)
        if self.head_sent:
            return b"0\r\n" + status + b"\r\n"
        self.head_sent = True
        return (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ncontent-length: 0\r\n"
            + header_lines(self._initial)
            + status
            + b"\r\n"
        )


class GrpcHttp1Server:
    """What every connection shares: the wrapped handlers and whether the server is serving (its health) or draining."""

    def __init__(self, handlers: Handlers, interceptor: ErrorStatusInterceptor) -> None:
        # The interceptor also refuses callers whose certificate it does not know (PERMISSION_DENIED).
        self.handlers = {method: interceptor.wrap(h, method) for method, h in handlers.by_method.items()}
        self.serving = True
        self._server: asyncio.Server | None = None
        self._rotation: asyncio.Task[None] | None = None
        self.connections: set[_Connection] = set()
        self.calls: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int, tls: ServerSslContext | None) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            host,
            port,
            ssl=tls.context if tls else None,
            reuse_address=True,
            backlog=ACCEPT_BACKLOG,  # Envoy opens a connection per concurrent call
        )
        if tls is not None:
            self._rotation = loop.create_task(tls.follow_rotation())
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self, grace: float) -> None:
        """No new connections; calls in flight get `grace` seconds, then are cancelled."""
        if self._rotation is not None:
            self._rotation.cancel()
        if self._server is None:
            return
        self._server.close()
        if self.calls:
            await asyncio.wait(self.calls, timeout=grace)
        for connection in list(self.connections):
            connection.close()


class _Connection(asyncio.Protocol):
    """One connection from Envoy: requests one at a time, in order."""

    def __init__(self, server: GrpcHttp1Server) -> None:
        self._server = server
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._call: Call | None = None
        self._task: asyncio.Task[None] | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._writable: asyncio.Event | None = None
        self.peer = ""
        self.identities: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's SSL transport is not a subclass
        self._server.connections.add(self)
        address = transport.get_extra_info("peername")
        self.peer = f"ipv4:{address[0]}:{address[1]}" if address else ""
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        self.identities = sorted(name.encode() for name in uri_names_of_der(der)) if der else []

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._writable is not None:
            self._writable.set()
        self._cancel("the caller went away")

    def pause_writing(self) -> None:
        self._writable = asyncio.Event()

    def resume_writing(self) -> None:
        if self._writable is not None:
            self._writable.set()
            self._writable = None

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._task is None:
            self._next()

    def write(self, data: bytes) -> None:
        if data and self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    async def drain(self) -> None:
        if self._writable is not None:
            await self._writable.wait()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _next(self) -> None:
        """Starts the next whole request in the buffer, if there is one."""
        try:
            parsed = parse_message(self._buffer, MAX_REQUEST_BYTES)
        except ValueError as error:
            log.warning("bad HTTP/1.1 request", error=str(error))
            self.write(_BAD_REQUEST)
            self.close()
            return
        if parsed is None:
            return
        request, used = parsed
        del self._buffer[:used]
        method, path, version = [*request.start_line.split(" "), "", ""][:3]
        if not version.startswith("HTTP/1.") or not path.startswith("/"):
            log.warning("bad HTTP/1.1 request", line=request.start_line[:80])
            self.write(_BAD_REQUEST)
            self.close()
            return
        if path == HEALTH_PATH:
            self.write(_HEALTHY if self._server.serving else _DRAINING)
            self._next()
            return
        self._task = asyncio.get_running_loop().create_task(self._serve(method, path, request.headers, request.body))
        self._server.calls.add(self._task)
        self._task.add_done_callback(self._server.calls.discard)

    def _cancel(self, why: str) -> None:
        if self._call is not None and self._call.cancelled_by is None:
            self._call.cancelled_by = why
        if self._task is not None:
            self._task.cancel()

    def _expire(self) -> None:
        self._cancel("deadline")

    async def _serve(self, method: str, path: str, headers: dict[str, str], body: bytes) -> None:
        timeout = grpc_timeout_s(headers.get("grpc-timeout", ""))
        call = self._call = Call(self, path, metadata_of(headers), None)
        if timeout is not None:
            call.deadline = time.monotonic() + timeout
            self._deadline_timer = asyncio.get_running_loop().call_later(timeout, self._expire)
        try:
            self.write(await self._answer(call, method, path, headers, body))
        except asyncio.CancelledError:
            if call.cancelled_by == "deadline":
                self.write(call.end(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded"))
            else:
                self.close()  # the caller went away: nothing to answer
        finally:
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
                self._deadline_timer = None
            self._call = self._task = None
        if self._buffer and self._transport is not None and not self._transport.is_closing():
            self._next()

    async def _answer(self, call: Call, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        handler = self._server.handlers.get(path)
        if method != "POST" or handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return call.end(grpc.StatusCode.UNIMPLEMENTED, f"method {path} is not served here")
        try:
            request = handler.request_deserializer(unframe(body))
        except Exception as error:  # noqa: BLE001 - any decoding failure is the caller's
            return call.end(grpc.StatusCode.INVALID_ARGUMENT, f"the request could not be decoded: {error}")
        service, _, name = path.lstrip("/").partition("/")
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        try:
            with server_span(path, headers, attributes):
                if handler.unary_unary is not None:
                    response = await handler.unary_unary(request, call)
                    return call.head() + chunk(frame(handler.response_serializer(response))) + call.end()
                async for message in handler.unary_stream(request, call):
                    self.write(call.head() + chunk(frame(handler.response_serializer(message))))
                    await self.drain()
                return call.end()
        except grpc.aio.AbortError:
            return call.end()
        except asyncio.CancelledError:
            raise
        except Exception:  # the interceptor maps errors; this is a last resort
            log.exception("call failed outside the interceptor", rpc=path)
            return call.end(grpc.StatusCode.INTERNAL, "internal error")
