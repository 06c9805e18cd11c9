"""The HTTP check's parsing and answers (the server itself runs in
tests/integration/test_http_ext_authz.py and behind Envoy in tests/e2e)."""

import asyncio
import json

import pytest

from mariana_common.errors import PermissionDenied, Unauthenticated
from services.auth.authorizer import Identity, QuotaExceeded, RateLimited, Scopes, Verdict
from services.auth.http_check import BadRequest, CheckServer, Head, answer, parse_head, response
from services.auth.rate_limit import Decision


def test_a_head_from_envoy_is_read_with_the_checked_path() -> None:
    head = parse_head(
        b"POST /check/v1/chat/completions?x=1 HTTP/1.1\r\nHost: auth\r\nAuthorization: Bearer sk-1\r\n"
        b"Content-Length: 0\r\nx-request-id: r-1"
    )
    assert (head.method, head.path, head.target) == (
        "POST",
        "/v1/chat/completions?x=1",
        "/check/v1/chat/completions?x=1",
    )
    assert head.headers == {
        "host": "auth",
        "authorization": "Bearer sk-1",
        "content-length": "0",
        "x-request-id": "r-1",
    }
    assert head.keep_alive
    assert not parse_head(b"GET /healthz HTTP/1.1\r\nConnection: close").keep_alive
    assert not parse_head(b"GET /healthz HTTP/1.0").keep_alive


@pytest.mark.parametrize(
    "raw",
    [
        b"POST /check/v1/models",
        b"POST /check/v1/models HTTP/2",
        b"POST  /check HTTP/1.1",
        b"POST /check HTTP/1.1\r\nno colon here",
        b"POST /check HTTP/1.1\r\n folded: header",
        b"POST /check HTTP/1.1\r\ncontent-length: 3",
        b"POST /check HTTP/1.1\r\ncontent-length: many",
        b"POST /check HTTP/1.1\r\ntransfer-encoding: chunked",
    ],
)
def test_malformed_heads_and_bodies_are_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest):
        parse_head(raw)


def split(raw: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    return status, dict(line.split(": ", 1) for line in lines), body


def test_an_allow_carries_the_identity_and_rate_headers() -> None:
    identity = Identity("t-1", "k-1", False, Scopes(models=frozenset({"m2", "m1"})))
    raw = answer(Verdict(identity, Decision(True, headers={"x-ratelimit-remaining-requests": "9"})), "")
    status, headers, body = split(raw)
    assert status == "HTTP/1.1 200 OK" and body == b""
    assert headers == {
        "content-length": "0",
        "x-mariana-tenant": "t-1",
        "x-mariana-key-id": "k-1",
        "x-mariana-models": "m1,m2",
        "x-ratelimit-remaining-requests": "9",
    }


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (Unauthenticated("invalid API key"), "HTTP/1.1 401 Unauthorized", "invalid_api_key"),
        (PermissionDenied("admin only"), "HTTP/1.1 403 Forbidden", "permission_denied"),
        (QuotaExceeded("spent"), "HTTP/1.1 429 Too Many Requests", "insufficient_quota"),
        (RateLimited(Decision(False, 2.5, {}, "tokens")), "HTTP/1.1 429 Too Many Requests", "rate_limit_exceeded"),
    ],
)
def test_a_denial_is_the_openai_error_with_its_status(error: Exception, status: str, code: str) -> None:
    for content_type in ("application/json", "application/grpc"):
        line, headers, body = split(answer(error, content_type))
        assert line == status
        assert json.loads(body)["error"]["code"] == code
        assert int(headers["content-length"]) == len(body)
        resource_exhausted = status.startswith("HTTP/1.1 429") and content_type == "application/grpc"
        assert headers.get("grpc-status") == ("8" if resource_exhausted else None)
    if isinstance(error, RateLimited):
        assert headers["retry-after"] == "2"


def test_a_response_counts_its_body() -> None:
    assert response(503, "Service Unavailable", [("retry-after", "1")], b"{}") == (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 2\r\nretry-after: 1\r\n\r\n{}"
    )


async def test_a_check_whose_caller_hung_up_is_dropped_quietly() -> None:
    """Envoy closes the connection when its timeout passes; the late answer is
    not written, and nothing fails in the server's event loop."""
    release = asyncio.Event()
    entered: asyncio.Queue[str] = asyncio.Queue()
    decided: list[str] = []

    async def decide(head: Head) -> bytes:
        entered.put_nowait(head.path)
        await release.wait()
        decided.append(head.path)
        return response(200, "OK", {"x-mariana-tenant": "t"})

    loop = asyncio.get_running_loop()
    failures: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: failures.append(context))
    server = await CheckServer(decide, frozenset()).start("127.0.0.1", 0, None)
    port = server.sockets[0].getsockname()[1]
    request = b"POST /check/v1/models HTTP/1.1\r\nhost: auth\r\ncontent-length: 0\r\n\r\n"
    try:
        _, hung_up = await asyncio.open_connection("127.0.0.1", port)
        hung_up.write(request)
        await entered.get()  # its check is being decided
        hung_up.close()  # what Envoy does at its timeout
        await hung_up.wait_closed()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        # by the time this one is being decided, the server has read the first one's close
        await entered.get()
        release.set()
        answered = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        writer.close()
    finally:
        server.close()
        loop.set_exception_handler(None)
    assert decided == ["/v1/models", "/v1/models"]
    assert answered.startswith(b"HTTP/1.1 200 OK") and b"x-mariana-tenant: t" in answered
    assert failures == []
