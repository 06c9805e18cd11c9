"""The gRPC-over-HTTP/1.1 server against a raw HTTP/1.1 client speaking as
Envoy does (a chunked request body; the status read from the trailers, or from
the headers of a trailers-only answer). The servicer is a small one for the
inference API, registered through the generated code, as services do."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Iterator
from urllib.parse import unquote

import grpc
import pytest
from google.rpc.error_details_pb2 import ErrorInfo
from google.rpc.status_pb2 import Status

from mariana.inference.v1 import inference_pb2 as pb
from mariana.inference.v1 import inference_pb2_grpc as pb_grpc
from mariana_common.errors import InvalidArgument, ResourceExhausted
from mariana_common.grpc_http1_server import GrpcHttp1Server, Handlers, grpc_timeout_s
from mariana_common.http1_wire import Message, chunk, frame, parse_message, unframe
from mariana_common.interceptors import STATUS_DETAILS, Context, ErrorStatusInterceptor

COMPLETE = "/mariana.inference.v1.InferenceService/Complete"
GENERATE = "/mariana.inference.v1.InferenceService/Generate"


class Servicer(pb_grpc.InferenceServiceServicer):
    """Answers by the request's `model`: what each test needs of a handler."""

    def __init__(self) -> None:
        self.seen_metadata: list[tuple[tuple[str, str | bytes], ...]] = []
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.release = asyncio.Event()

    async def Complete(self, request: pb.GenerateRequest, context: Context) -> pb.GenerateResponse:
        self.seen_metadata.append(tuple(context.invocation_metadata() or ()))
        if request.model == "full":
            raise ResourceExhausted("the batch is full: 100% taken", retry_after_s=3, reason="batch_full")
        if request.model == "bad":
            raise InvalidArgument("no such thing")
        if request.model == "broken":
            raise RuntimeError("a bug")
        if request.model in ("slow", "held"):
            self.started.set()
            try:
                await (asyncio.sleep(5) if request.model == "slow" else self.release.wait())
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        context.set_trailing_metadata((("x-mariana-route", "primary"),))
        return pb.GenerateResponse(text=f"echo {request.request_id}", finish_reason="stop")

    async def Generate(self, request: pb.GenerateRequest, context: Context) -> AsyncIterator[pb.GenerateResponse]:
        await context.send_initial_metadata((("x-mariana-model", request.model),))
        for word in ("one", "two", "three"):
            yield pb.GenerateResponse(text=word)
        if request.model == "fails-midway":
            raise ResourceExhausted("ran out midway")
        yield pb.GenerateResponse(finish_reason="stop")


async def start(servicer: Servicer, peers: frozenset[str] = frozenset()) -> tuple[GrpcHttp1Server, int]:
    handlers = Handlers()
    pb_grpc.add_InferenceServiceServicer_to_server(servicer, handlers)  # type: ignore[arg-type]
    server = GrpcHttp1Server(handlers, ErrorStatusInterceptor(peers))
    port = await server.start("127.0.0.1", 0, None)
    return server, port


def request(path: str, message: bytes, headers: dict[str, str] | None = None, method: str = "POST") -> bytes:
    """As Envoy sends a gRPC call upstream over HTTP/1.1: the body chunked."""
    lines = [f"{method} {path} HTTP/1.1", "host: inference", "content-type: application/grpc", "te: trailers"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines.append("transfer-encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + chunk(frame(message)) + b"0\r\n\r\n"


class Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.buffer = bytearray()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> Message:
        while True:
            parsed = parse_message(self.buffer, 1 << 20)
            if parsed is not None:
                message, used = parsed
                del self.buffer[:used]
                return message
            data = await asyncio.wait_for(self.reader.read(65536), 5)
            if not data:
                raise ConnectionError("closed")
            self.buffer += data

    async def call(self, path: str, req: pb.GenerateRequest, headers: dict[str, str] | None = None) -> Message:
        await self.send(request(path, req.SerializeToString(), headers))
        return await self.answer()


async def connect(port: int) -> Client:
    return Client(*await asyncio.open_connection("127.0.0.1", port))


def status(answer: Message) -> tuple[int, str]:
    """grpc-status and message from the trailers, or the headers when trailers-only."""
    fields = answer.trailers if "grpc-status" in answer.trailers else answer.headers
    return int(fields["grpc-status"]), unquote(fields.get("grpc-message", ""))


def messages(body: bytes) -> Iterator[pb.GenerateResponse]:
    at = 0
    while at < len(body):
        length = int.from_bytes(body[at + 1 : at + 5], "big")
        yield pb.GenerateResponse.FromString(body[at + 5 : at + 5 + length])
        at += 5 + length


async def test_a_unary_call_answers_with_its_status_and_metadata_in_the_trailers() -> None:
    servicer = Servicer()
    server, port = await start(servicer)
    client = await connect(port)
    binary = base64.b64encode(b"\x00\x01\xff").decode().rstrip("=")
    for n in range(2):  # one keep-alive connection, calls in turn
        answer = await client.call(
            COMPLETE, pb.GenerateRequest(request_id=f"r{n}"), {"x-request-id": f"t{n}", "trace-bin": binary}
        )
        assert answer.start_line == "HTTP/1.1 200 OK" and answer.headers["content-type"] == "application/grpc"
        assert pb.GenerateResponse.FromString(unframe(answer.body)).text == f"echo r{n}"
        assert status(answer) == (0, "")
        assert answer.trailers["x-mariana-route"] == "primary"
    metadata = dict(servicer.seen_metadata[1])
    assert metadata["x-request-id"] == "t1" and metadata["trace-bin"] == b"\x00\x01\xff"
    assert "content-type" not in metadata and "transfer-encoding" not in metadata
    await server.stop(1)


async def test_a_refusal_is_trailers_only_with_code_retry_hint_and_reason() -> None:
    server, port = await start(Servicer())
    client = await connect(port)
    answer = await client.call(COMPLETE, pb.GenerateRequest(model="full"))
    assert answer.body == b"" and answer.trailers == {}  # all in the headers, which Envoy's retries read
    assert status(answer) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "the batch is full: 100% taken")
    assert answer.headers["retry-after"] == "3"
    details = Status.FromString(base64.b64decode(answer.headers[STATUS_DETAILS] + "=="))
    info = ErrorInfo()
    assert details.details[0].Unpack(info) and info.reason == "batch_full"
    answer = await client.call(COMPLETE, pb.GenerateRequest(model="bad"))
    assert status(answer) == (grpc.StatusCode.INVALID_ARGUMENT.value[0], "no such thing")
    answer = await client.call(COMPLETE, pb.GenerateRequest(model="broken"))
    code, message = status(answer)
    assert code == grpc.StatusCode.INTERNAL.value[0] and message.startswith("internal error (trace id")
    answer = await client.call(COMPLETE, pb.GenerateRequest(request_id="still here"))  # the connection lives on
    assert pb.GenerateResponse.FromString(unframe(answer.body)).text == "echo still here"
    await server.stop(1)


async def test_a_stream_is_a_chunk_per_message_then_the_status() -> None:
    server, port = await start(Servicer())
    client = await connect(port)
    answer = await client.call(GENERATE, pb.GenerateRequest(model="tiny"))
    assert answer.headers["x-mariana-model"] == "tiny"
    assert [m.text or m.finish_reason for m in messages(answer.body)] == ["one", "two", "three", "stop"]
    assert status(answer) == (0, "")
    answer = await client.call(GENERATE, pb.GenerateRequest(model="fails-midway"))
    assert [m.text for m in messages(answer.body)] == ["one", "two", "three"]
    assert status(answer) == (grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "ran out midway")
    await server.stop(1)


async def test_a_call_past_its_deadline_is_cancelled_and_answered_deadline_exceeded() -> None:
    servicer = Servicer()
    server, port = await start(servicer)
    client = await connect(port)
    answer = await client.call(COMPLETE, pb.GenerateRequest(model="slow"), {"grpc-timeout": "50m"})
    assert status(answer)[0] == grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
    assert servicer.cancelled.is_set()
    answer = await client.call(COMPLETE, pb.GenerateRequest(request_id="next"), {"grpc-timeout": "5S"})
    assert status(answer) == (0, "")
    await server.stop(1)


async def test_a_caller_gone_cancels_its_call() -> None:
    servicer = Servicer()
    server, port = await start(servicer)
    client = await connect(port)
    await client.send(request(COMPLETE, pb.GenerateRequest(model="held").SerializeToString()))
    await asyncio.wait_for(servicer.started.wait(), 5)
    client.writer.close()
    await asyncio.wait_for(servicer.cancelled.wait(), 5)
    await server.stop(1)


async def test_what_it_does_not_serve_gets_a_clear_status() -> None:
    server, port = await start(Servicer())
    client = await connect(port)
    answer = await client.call("/mariana.inference.v1.InferenceService/Nope", pb.GenerateRequest())
    assert status(answer)[0] == grpc.StatusCode.UNIMPLEMENTED.value[0]
    await client.send(request(COMPLETE, b"\xff\xff not protobuf"))
    assert status(await client.answer())[0] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    await client.send(b"this is not HTTP\r\n\r\n")
    answer = await client.answer()
    assert answer.start_line.startswith("HTTP/1.1 400") and answer.headers["connection"] == "close"
    await server.stop(1)


async def test_health_follows_serving_and_draining() -> None:
    server, port = await start(Servicer())
    client = await connect(port)
    await client.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (await client.answer()).start_line == "HTTP/1.1 200 OK"
    server.serving = False
    await client.send(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
    assert (await client.answer()).start_line.startswith("HTTP/1.1 503")
    await server.stop(1)


async def test_a_caller_without_an_allowed_identity_is_refused() -> None:
    server, port = await start(Servicer(), peers=frozenset({"spiffe://mariana.local/envoy"}))
    client = await connect(port)  # no certificate at all
    answer = await client.call(COMPLETE, pb.GenerateRequest())
    assert status(answer)[0] == grpc.StatusCode.PERMISSION_DENIED.value[0]
    await server.stop(1)


async def test_stopping_lets_a_call_in_flight_finish() -> None:
    servicer = Servicer()
    server, port = await start(servicer)
    client = await connect(port)
    await client.send(request(COMPLETE, pb.GenerateRequest(model="held", request_id="last").SerializeToString()))
    await asyncio.wait_for(servicer.started.wait(), 5)
    stopping = asyncio.create_task(server.stop(5))
    await asyncio.sleep(0.05)
    assert not stopping.done()
    servicer.release.set()
    answer = await client.answer()
    assert pb.GenerateResponse.FromString(unframe(answer.body)).text == "echo last"
    await asyncio.wait_for(stopping, 5)
    with pytest.raises(OSError):
        await connect(port)


@pytest.mark.parametrize(
    ("value", "seconds"), [("50m", 0.05), ("2S", 2.0), ("1H", 3600.0), ("100u", 1e-4), ("", None), ("5x", None)]
)
def test_grpc_timeout_header(value: str, seconds: float | None) -> None:
    assert grpc_timeout_s(value) == (pytest.approx(seconds) if seconds is not None else None)
