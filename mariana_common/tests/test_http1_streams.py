"""Streams over the mesh's HTTP/1.1: the parser that hands on each gRPC
message as soon as it is whole, and the client against a local HTTP/1.1 peer
that answers as Envoy does on a stream's route (chunked, status in trailers)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from mariana_common.http1_bridge import BridgedStream, Http1Pool
from mariana_common.http1_wire import StreamParser, chunk, frame
from mariana_common.tests.test_http1_bridge import Peer

STREAM_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n\r\n"


def streamed(*messages: bytes, trailers: bytes = b"grpc-status: 0\r\n") -> bytes:
    return STREAM_HEAD + b"".join(chunk(frame(m)) for m in messages) + b"0\r\n" + trailers + b"\r\n"


def test_messages_come_out_as_soon_as_whole_whatever_the_split() -> None:
    answer = streamed(b"one", b"two" * 50, b"", trailers=b"grpc-status: 0\r\nx-route: primary\r\n")
    for size in (1, 2, 7, 64, len(answer)):
        parser = StreamParser(1 << 20)
        got = []
        for at in range(0, len(answer), size):
            got += parser.feed(answer[at : at + size])
        assert got == [b"one", b"two" * 50, b""]
        assert parser.done and parser.status == 200 and parser.trailers == {"grpc-status": "0", "x-route": "primary"}


def test_a_message_split_across_chunks_and_a_chunk_with_two_messages() -> None:
    body = frame(b"first") + frame(b"second")
    answer = STREAM_HEAD + chunk(body[:3]) + chunk(body[3:9]) + chunk(body[9:]) + b"0\r\n\r\n"
    parser = StreamParser(1 << 20)
    assert parser.feed(answer) == [b"first", b"second"] and parser.done and parser.trailers == {}


def test_a_trailers_only_answer_ends_at_its_head() -> None:
    parser = StreamParser(1 << 20)
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ngrpc-status: 8\r\ncontent-length: 0\r\n\r\n"
    assert parser.feed(head) == [] and parser.done and parser.headers["grpc-status"] == "8"


@pytest.mark.parametrize(
    "bad",
    [
        b"SSH-2.0-OpenSSH\r\n\r\n",
        STREAM_HEAD + b"zz\r\n",
        STREAM_HEAD + chunk(b"\x01\x00\x00\x00\x01x"),  # compressed
        STREAM_HEAD + chunk(b"\x00\xff\xff\xff\xff"),  # past the limit
        STREAM_HEAD + b"3\r\nabcXY",  # a chunk without its CRLF
        STREAM_HEAD + chunk(b"\x00\x00\x00\x00\x09ab") + b"0\r\n\r\n",  # ends inside a message
    ],
)
def test_what_is_not_a_grpc_stream_is_refused(bad: bytes) -> None:
    with pytest.raises(ValueError):
        StreamParser(1 << 20).feed(bad)


@pytest.fixture
async def stream_peer() -> AsyncIterator[tuple[Peer, Http1Pool]]:
    server_peer = Peer(lambda n, w: streamed(b"a%d" % n, b"b%d" % n))
    server = await asyncio.start_server(server_peer.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Http1Pool(f"127.0.0.1:{port}", None)
    yield server_peer, pool
    await pool.close()
    server.close()


async def collect(pool: Http1Pool) -> list[bytes]:
    return [m async for m in pool.stream("/p.S/Stream", b"ask", 5.0, [("x-request-id", "r")])]


async def test_streams_reuse_one_connection_and_end_on_their_status(stream_peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = stream_peer
    assert await collect(pool) == [b"a1", b"b1"]
    assert await collect(pool) == [b"a2", b"b2"]
    assert server.connections == 1
    assert b"x-request-id: r" in server.requests[0] and b"grpc-timeout: " in server.requests[0]


async def test_a_status_in_the_trailers_after_messages_is_raised(stream_peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = stream_peer
    server.behave = lambda n, w: streamed(b"partial", trailers=b"grpc-status: 8\r\ngrpc-message: full%21\r\n")
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for message in pool.stream("/p.S/Stream", b"", 5.0, ()):
            got.append(message)
    assert got == [b"partial"]
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and error.value.details() == "full!"
    server.behave = lambda n, w: streamed(b"whole")
    assert await collect(pool) == [b"whole"]
    assert server.connections == 1  # the failed stream was answered whole: its connection is reused


async def test_a_stream_cut_off_is_unavailable(stream_peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = stream_peer

    def cut(n: int, writer: asyncio.StreamWriter) -> bytes:
        asyncio.get_running_loop().call_later(0.01, writer.transport.close)
        return STREAM_HEAD + chunk(frame(b"only this"))

    server.behave = cut
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for message in pool.stream("/p.S/Stream", b"", 5.0, ()):
            got.append(message)
    assert got == [b"only this"] and error.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_a_stream_past_its_deadline_ends_deadline_exceeded(stream_peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = stream_peer
    server.behave = lambda n, w: STREAM_HEAD + chunk(frame(b"first"))  # and then nothing
    got = []
    with pytest.raises(grpc.aio.AioRpcError) as error:
        async for message in pool.stream("/p.S/Stream", b"", 0.1, ()):
            got.append(message)
    assert got == [b"first"] and error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert pool.open_connections() == 0  # the unfinished answer's connection is closed


async def test_a_stream_left_early_closes_its_connection(stream_peer: tuple[Peer, Http1Pool]) -> None:
    server, pool = stream_peer
    server.behave = lambda n, w: STREAM_HEAD + chunk(frame(b"first")) + chunk(frame(b"second"))
    call = BridgedStream(lambda: pool, "/p.S/Stream", lambda m: m, lambda b: b.decode())(b"", timeout=5)
    async for message in call:
        assert message == "first"
        break
    call.cancel()
    await asyncio.sleep(0.05)
    assert pool.open_connections() == 0


async def test_a_reused_connection_closed_before_the_stream_answers_is_tried_once_more(
    stream_peer: tuple[Peer, Http1Pool],
) -> None:
    server, pool = stream_peer

    def close_on_second(n: int, writer: asyncio.StreamWriter) -> bytes | None:
        if n == 2:
            writer.transport.close()
            return None
        return streamed(b"m%d" % n)

    server.behave = close_on_second
    assert await collect(pool) == [b"m1"]
    assert await collect(pool) == [b"m3"]
    assert server.connections == 2
