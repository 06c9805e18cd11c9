"""HTTP/1.1 messages as Envoy and the mesh's gRPC-over-HTTP/1.1 code exchange
them (`http1_bridge`, the client; `grpc_http1_server`, the server): one
message parsed whole from the start of a buffer (content-length or chunked,
chunked trailers kept), and gRPC's length-prefixed framing."""

from __future__ import annotations

MAX_HEAD_BYTES = 64 * 1024
# Envoy's health check of an HTTP/1.1 server of ours: 200 while serving, 503 once draining.
HEALTH_PATH = "/healthz"


class Message:
    """A request or an answer: its first line, headers (names lower-cased),
    body and, when chunked, trailers."""

    __slots__ = ("body", "headers", "start_line", "trailers")

    def __init__(self, start_line: str, headers: dict[str, str], body: bytes, trailers: dict[str, str]) -> None:
        self.start_line = start_line
        self.headers = headers
        self.body = body
        self.trailers = trailers


def _fields(lines: list[str]) -> dict[str, str]:
    fields: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {line[:40]!r}")
        fields[name.lower()] = value.strip()
    return fields


def parse_message(buffer: bytes | bytearray, max_body: int) -> tuple[Message, int] | None:
    """The message at the start of `buffer` and how many bytes it took; None
    while it is incomplete. ValueError when it is not HTTP/1.1 or its body
    would pass `max_body` bytes."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > MAX_HEAD_BYTES:
            raise ValueError("head too long")
        return None
    start_line, *lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
    headers = _fields(lines)
    start = end + 4
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return _chunked(buffer, start, start_line, headers, max_body)
    try:
        length = int(headers.get("content-length", "0"))
    except ValueError as error:
        raise ValueError("bad content-length") from error
    if not 0 <= length <= max_body:
        raise ValueError(f"a body of {length} bytes is more than {max_body}")
    if len(buffer) < start + length:
        return None
    return Message(start_line, headers, bytes(buffer[start : start + length]), {}), start + length


def _chunked(
    buffer: bytes | bytearray, at: int, start_line: str, headers: dict[str, str], max_body: int
) -> tuple[Message, int] | None:
    body = bytearray()
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        try:
            size = int(bytes(buffer[at:line_end]).split(b";")[0], 16)
        except ValueError as error:
            raise ValueError("bad chunk size") from error
        if size < 0 or len(body) + size > max_body:
            raise ValueError(f"a body of more than {max_body} bytes")
        at = line_end + 2
        if size == 0:
            trailer_end = buffer.find(b"\r\n\r\n", at - 2)
            if trailer_end < 0:
                return None
            lines = bytes(buffer[at:trailer_end]).decode("latin-1").split("\r\n") if trailer_end > at else []
            return Message(start_line, headers, bytes(body), _fields(lines)), trailer_end + 4
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at : at + size]
        at += size + 2


def frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def unframe(body: bytes) -> bytes:
    """The one message of a unary body."""
    if len(body) < 5 or body[0] != 0:
        raise ValueError("the body is not one uncompressed gRPC message")
    length = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + length:
        raise ValueError("the body's gRPC frame does not match its length")
    return body[5:]


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class StreamParser:
    """An answer read as it arrives: its head, then each gRPC message of its
    chunked body as soon as it is whole, then its trailers. `feed` returns the
    messages completed by the bytes given; `done` once the answer has ended.
    ValueError when it is not HTTP/1.1 or not gRPC framing."""

    def __init__(self, max_message: int) -> None:
        self._max_message = max_message
        self._buffer = bytearray()
        self._frames = bytearray()
        self._state = "head"
        self._left = 0  # of the current chunk, or of a body with a content-length
        self.status = 0
        self.headers: dict[str, str] = {}
        self.trailers: dict[str, str] = {}
        self.done = False
        self.received = False  # any byte of the answer

    def feed(self, data: bytes) -> list[bytes]:
        self.received = self.received or bool(data)
        self._buffer += data
        while not self.done and self._step():
            pass
        return self._messages()

    def _step(self) -> bool:
        """One step of parsing; False when more bytes are needed."""
        buffer = self._buffer
        if self._state == "head":
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise ValueError("head too long")
                return False
            start_line, *lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            version, _, rest = start_line.partition(" ")
            if not version.startswith("HTTP/1."):
                raise ValueError(f"not an HTTP/1.1 answer: {start_line[:40]!r}")
            self.status, self.headers = int(rest[:3]), _fields(lines)
            del buffer[: end + 4]
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                self._state = "size"
            else:
                self._state, self._left = "body", int(self.headers.get("content-length", "0"))
                self.done = self._left == 0
            return True
        if self._state == "size":
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return False
            self._left = int(bytes(buffer[:line_end]).split(b";")[0], 16)
            del buffer[: line_end + 2]
            self._state = "data" if self._left else "trailers"
            return True
        if self._state in ("data", "body"):
            if not buffer:
                return False
            taken = min(self._left, len(buffer))
            self._frames += buffer[:taken]
            del buffer[:taken]
            self._left -= taken
            if self._left:
                return False
            if self._state == "body":
                self.done = True
                return False
            self._state = "chunk end"
            return True
        if self._state == "chunk end":
            if len(buffer) < 2:
                return False
            if buffer[:2] != b"\r\n":
                raise ValueError("a chunk does not end with CRLF")
            del buffer[:2]
            self._state = "size"
            return True
        # trailers: lines up to an empty one
        end = buffer.find(b"\r\n\r\n") if not buffer.startswith(b"\r\n") else -2
        if end == -1:
            return False
        if end >= 0:
            self.trailers = _fields(bytes(buffer[:end]).decode("latin-1").split("\r\n"))
            del buffer[: end + 4]
        else:
            del buffer[:2]
        self.done = True
        return False

    def _messages(self) -> list[bytes]:
        out = []
        frames = self._frames
        while len(frames) >= 5:
            if frames[0] != 0:
                raise ValueError("a compressed gRPC message was not asked for")
            length = int.from_bytes(frames[1:5], "big")
            if length > self._max_message:
                raise ValueError(f"a gRPC message of {length} bytes is more than {self._max_message}")
            if len(frames) < 5 + length:
                break
            out.append(bytes(frames[5 : 5 + length]))
            del frames[: 5 + length]
        if self.done and frames:
            raise ValueError("the answer ended inside a gRPC message")
        return out
