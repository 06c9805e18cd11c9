"""The HTTP/1.1 side of unary mesh calls: reading Envoy's bridged answers,
the statuses they become, and the connection pool's handling of connections
that close, stall or go away. The whole path through Envoy's bridge is in the
end-to-end tests (every non-streamed chat takes it)."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Callable

import grpc
import pytest

from mariana_common import http1_bridge
from mariana_common.errors import ResourceExhausted
from mariana_common.http1_bridge import (
    Answer,
    Http1Pool,
    addresses_of,
    frame,
    grpc_timeout,
    parse_answer,
    rpc_error,
    status_of,
    unframe,
)
from mariana_common.interceptors import STATUS_DETAILS, error_from_rpc, status_details

OK_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: 0\r\n"


def ok_answer(message: bytes) -> bytes:
    body = frame(message)
    return OK_HEAD + b"content-length: %d\r\n\r\n" % len(body) + body


def test_an_answer_is_read_once_whole_by_length_or_chunks() -> None:
    whole = ok_answer(b"hello")
    for cut in (0, 10, len(whole) - 1):
        assert parse_answer(whole[:cut]) is None
    answer, used = parse_answer(whole + b"HTTP/1.1 next") or (None, 0)
    assert answer is not None and used == len(whole)
    assert answer.status == 200 and answer.headers["grpc-status"] == "0" and unframe(answer.body) == b"hello"

    body = frame(b"chunked!")
    chunked = OK_HEAD + b"transfer-encoding: chunked\r\n\r\n" + b"%x\r\n%b\r\n" % (4, body[:4])
    chunked += b"%x\r\n%b\r\n0\r\n\r\n" % (len(body) - 4, body[4:])
    assert parse_answer(chunked[:-2]) is None
    parsed = parse_answer(chunked)
    assert parsed is not None and unframe(parsed[0].body) == b"chunked!" and parsed[1] == len(chunked)


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n"])
def test_what_is_not_http_is_refused(garbage: bytes) -> None:
    with pytest.raises(ValueError):
        parse_answer(garbage)


@pytest.mark.parametrize("body", [b"", b"\x01\x00\x00\x00\x01x", b"\x00\x00\x00\x00\x05abc"])
def test_a_body_that_is_not_one_plain_message_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        unframe(body)


def test_statuses_come_from_grpc_status_or_else_from_the_http_status() -> None:
    bridged = Answer(200, {"grpc-status": "5", "grpc-message": "model%20%27x%27%20is%20not%20here"}, b"")
    assert status_of(bridged) == (grpc.StatusCode.NOT_FOUND, "model 'x' is not here")
    assert status_of(Answer(503, {}, b""))[0] is grpc.StatusCode.UNAVAILABLE
    assert status_of(Answer(403, {}, b""))[0] is grpc.StatusCode.PERMISSION_DENIED
    assert status_of(Answer(500, {}, b""))[0] is grpc.StatusCode.UNKNOWN
    assert status_of(Answer(200, {"grpc-status": "99"}, b""))[0] is grpc.StatusCode.UNKNOWN


def test_a_bridged_error_passes_on_its_reason_and_retry_hint() -> None:
    details = status_details(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow down", "rate_limited")
    headers = {
        "grpc-status": "8",
        STATUS_DETAILS: base64.b64encode(details).decode().rstrip("="),  # gRPC sends it unpadded
        "retry-after": "3",
        "server": "envoy",
    }
    code, message = status_of(Answer(200, headers, b""))
    passed_on = error_from_rpc(rpc_error(code, message, headers))
    assert isinstance(passed_on, ResourceExhausted)
    assert passed_on.retry_after_s == 3 and passed_on.reason == "rate_limited"


def test_grpc_timeout_fits_the_header_s_eight_digits() -> None:
    assert grpc_timeout(0.0000001) == "1u"
    assert grpc_timeout(2.5) == "2500000u"
    assert grpc_timeout(600) == "600S"


def test_targets_may_list_several_envoys() -> None:
    assert addresses_of("127.0.0.1:7201") == [("127.0.0.1", 7201)]
    assert addresses_of("ipv4:127.0.0.1:7201,127.0.0.1:7301") == [("127.0.0.1", 7201), ("127.0.0.1", 7301)]


class Peer:
    """A local HTTP/1.1 server standing in for Envoy's listener: `behave`
    decides, per request, what goes back on the connection."""

    def __init__(self, behave: Callable[[int, asyncio.StreamWriter], bytes | None]) -> None:
        self.behave = behave
        self.connections = 0
        self.requests: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                reply = self.behave(len(self.requests), writer)
                if reply is None:
                    continue
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def peer() -> AsyncIterator[tuple[Peer, Http1Pool]]:
    server_peer = Peer(lambda n, w: ok_answer(b"answer %d" % n))
    server = await asyncio.start_server(server_peer.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool(f"127.0.0.1:{port}", None)
    yield server_peer, pool
    await pool.close()
    server.close()


async def test_calls_reuse_one_connection_and_carry_deadline_and_metadata(peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = peer
    for n in (1, 2, 3):
        assert await pool.call("/p.S/M", b"ask", 5.0, [("x-request-id", "r1"), ("blob-bin", b"\x00\xff")]) == (
            b"answer %d" % n
        )
    assert server.connections == 1
    head, _, body = server.requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /p.S/M HTTP/1.1\r\n") and unframe(body) == b"ask"
    lines = head.decode().split("\r\n")
    assert "x-request-id: r1" in lines and "blob-bin: AP8=" in lines and "te: trailers" in lines
    assert any(line.startswith("grpc-timeout: ") and line.endswith("u") for line in lines)


async def test_a_connection_closed_while_idle_is_replaced_without_an_error(peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = peer

    def answer_then_close(n: int, writer: asyncio.StreamWriter) -> bytes:
        if n == 1:  # the keep-alive connection goes away once idle
            asyncio.get_running_loop().call_later(0.01, writer.transport.close)
        return ok_answer(b"answer %d" % n)

    server.behave = answer_then_close
    assert await pool.call("/p.S/M", b"", 5.0, ()) == b"answer 1"
    # Time for the close to reach the pool while the connection sits idle. Had
    # it not yet, the next call would meet it on the way: the race of the next
    # test, which must come out the same.
    await asyncio.sleep(0.05)
    assert await pool.call("/p.S/M", b"", 5.0, ()) == b"answer 2"
    assert server.connections == 2


async def test_a_reused_connection_closed_before_any_answer_is_tried_once_more(peer: tuple[Peer, Http1Pool]) -> None:
    """Envoy closing an idle connection just as a request goes out on it: no
    service saw that request, so it goes again on a new connection."""
    server, pool = peer

    def close_on_second(n: int, writer: asyncio.StreamWriter) -> bytes | None:
        if n == 2:
            writer.transport.close()
            return None
        return ok_answer(b"answer %d" % n)

    server.behave = close_on_second
    assert await pool.call("/p.S/M", b"", 5.0, ()) == b"answer 1"
    assert await pool.call("/p.S/M", b"", 5.0, ()) == b"answer 3"
    assert server.connections == 2 and len(server.requests) == 3


async def test_an_answer_cut_short_is_unavailable_and_not_sent_again(peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = peer

    def half(n: int, writer: asyncio.StreamWriter) -> bytes:
        if n == 1:
            return ok_answer(b"whole")
        asyncio.get_running_loop().call_later(0.01, writer.transport.close)
        return ok_answer(b"x" * 100)[:40]

    server.behave = half
    assert await pool.call("/p.S/M", b"", 5.0, ()) == b"whole"
    with pytest.raises(grpc.aio.AioRpcError) as error:  # on the reused connection, part of an answer came
        await pool.call("/p.S/M", b"", 5.0, ())
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE
    assert len(server.requests) == 2


async def test_no_answer_in_time_is_deadline_exceeded_and_the_connection_is_dropped(
    peer: tuple[Peer, Http1Pool],
) -> None:
    server, pool = peer
    server.behave = lambda n, w: None if n == 1 else ok_answer(b"late enough")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pool.call("/p.S/M", b"", 0.05, ())
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert await pool.call("/p.S/M", b"", 5.0, ()) == b"late enough"
    assert server.connections == 2  # the first one's answer may still come: never reused


async def test_a_cancelled_call_closes_its_connection(peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = peer
    arrived = asyncio.Event()

    def hold_the_first(n: int, writer: asyncio.StreamWriter) -> bytes | None:
        arrived.set()
        return None if n == 1 else ok_answer(b"fresh")

    server.behave = hold_the_first
    call = asyncio.ensure_future(pool.call("/p.S/M", b"", None, ()))
    await arrived.wait()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await pool.call("/p.S/M", b"", 5.0, ()) == b"fresh"
    assert server.connections == 2


async def test_an_error_status_is_raised_with_its_details(peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = peer
    refusal = b"HTTP/1.1 200 OK\r\ngrpc-status: 3\r\ngrpc-message: bad%20x\r\ncontent-length: 0\r\n\r\n"
    server.behave = lambda n, w: refusal if n == 1 else ok_answer(b"fine")
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pool.call("/p.S/M", b"", 5.0, ())
    assert (error.value.code(), error.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "bad x")
    assert await pool.call("/p.S/M", b"", 5.0, ()) == b"fine"
    assert server.connections == 1  # an error status is an answer: the connection stays in use


async def test_no_listener_is_unavailable() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    pool = Http1Pool(f"ipv4:127.0.0.1:{port}", None)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pool.call("/p.S/M", b"", 1.0, ())
    assert error.value.code() is grpc.StatusCode.UNAVAILABLE


async def test_connections_left_idle_after_a_burst_are_closed_as_calls_go_on(
    peer: tuple[Peer, Http1Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, pool = peer
    burst = await asyncio.gather(*(pool.call("/p.S/M", b"", 5.0, ()) for _ in range(3)))
    assert len(burst) == 3 and server.connections == 3
    monkeypatch.setattr(http1_bridge, "IDLE_REUSE_S", 0.05)
    await asyncio.sleep(0.1)
    for _ in range(3):  # one at a time: each call closes one connection that sat too long
        await pool.call("/p.S/M", b"", 5.0, ())
    assert pool.open_connections() == 1


async def test_an_envoy_that_never_finishes_the_handshake_does_not_outlast_the_deadline() -> None:
    stalled: list[asyncio.StreamWriter] = []

    async def accept_and_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stalled.append(writer)  # accepted, and not a byte of TLS back

    server = await asyncio.start_server(accept_and_stall, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool(f"127.0.0.1:{port}", ssl.create_default_context)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pool.call("/p.S/M", b"", 0.2, ())
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert loop.time() - started < 5  # not the 60 s of asyncio's handshake timeout
    assert stalled
    await pool.close()
    server.close()


async def test_past_the_calls_in_flight_a_call_waits_within_its_deadline(
    peer: tuple[Peer, Http1Pool], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, pool = peer
    monkeypatch.setattr(pool, "_in_flight", asyncio.Semaphore(1))
    arrived = asyncio.Event()

    def hold_the_first(n: int, writer: asyncio.StreamWriter) -> bytes | None:
        arrived.set()
        return None if n == 1 else ok_answer(b"next")

    server.behave = hold_the_first
    held = asyncio.ensure_future(pool.call("/p.S/M", b"", None, ()))  # holds the only slot, never answered
    await arrived.wait()
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pool.call("/p.S/M", b"", 0.1, ())
    assert error.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    held.cancel()
    with pytest.raises(asyncio.CancelledError):
        await held
    assert await pool.call("/p.S/M", b"", 5.0, ()) == b"next"  # the slot came back


async def test_an_answer_that_is_not_http_is_an_rpc_error(peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = peer
    server.behave = lambda n, w: b"SSH-2.0-OpenSSH_9.2\r\n\r\n"
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await pool.call("/p.S/M", b"", 5.0, ())
    assert error.value.code() is grpc.StatusCode.INTERNAL and "not HTTP/1.1" in (error.value.details() or "")
