"""auth reads and writes Envoy's ext_authz messages through its own compiled
subset (ext_authz_wire.proto); these check it against envoy-data-plane's full
definitions, in both directions."""

from envoy_data_plane.envoy.config.core.v3 import Address, HeaderValueOptionHeaderAppendAction, SocketAddress
from envoy_data_plane.envoy.service.auth.v3 import (
    AttributeContext,
    AttributeContextHttpRequest,
    AttributeContextPeer,
    AttributeContextRequest,
    CheckRequest,
    CheckResponse,
)
from envoy_data_plane.envoy.type.v3 import StatusCode

from mariana.auth.v1.ext_authz_wire_pb2 import ExtAuthzCheckRequest, ExtAuthzCheckResponse
from mariana_common.errors import PermissionDenied
from services.auth.authorizer import Identity, QuotaExceeded, RateLimited, Scopes, Verdict
from services.auth.ext_authz import allow, deny
from services.auth.rate_limit import Decision


def test_envoys_check_request_parses_with_the_fields_auth_reads() -> None:
    http = AttributeContextHttpRequest(
        id="r-1",
        method="POST",
        headers={"authorization": "Bearer sk-1", "x-request-id": "r-1"},
        path="/v1/chat/completions",
        host="edge",
        size=42,
        body="{}",
    )
    peer = AttributeContextPeer(address=Address(socket_address=SocketAddress(address="127.0.0.1", port_value=9)))
    envoy = CheckRequest(
        attributes=AttributeContext(
            source=peer, request=AttributeContextRequest(http=http), context_extensions={"a": "b"}
        )
    )
    ours = ExtAuthzCheckRequest.FromString(bytes(envoy))
    parsed = ours.attributes.request.http
    assert (parsed.method, parsed.path) == ("POST", "/v1/chat/completions")
    assert dict(parsed.headers) == {"authorization": "Bearer sk-1", "x-request-id": "r-1"}


def as_envoy_reads_it(raw: bytes) -> CheckResponse:
    """Envoy (C++ protobuf) merges the concatenated parts of an answer; the
    pure-Python parser would keep only the last, so merge first."""
    return CheckResponse.parse(ExtAuthzCheckResponse.FromString(raw).SerializeToString())


def test_an_allow_is_envoys_ok_response_with_identity_and_rate_headers() -> None:
    identity = Identity("t-1", "k-1", False, Scopes(models=frozenset({"m2", "m1"})))
    rate = Decision(True, headers={"x-ratelimit-remaining-requests": "9"})
    response = as_envoy_reads_it(allow(Verdict(identity, rate)))
    assert response.status.code == 0
    upstream = {h.header.key: h.header.value for h in response.ok_response.headers}
    assert upstream == {"x-mariana-tenant": "t-1", "x-mariana-key-id": "k-1", "x-mariana-models": "m1,m2"}
    actions = {h.append_action for h in response.ok_response.headers}
    assert actions == {HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD}
    client = {h.header.key: h.header.value for h in response.ok_response.response_headers_to_add}
    assert client == {"x-ratelimit-remaining-requests": "9"}


def test_denials_are_envoys_denied_responses_with_openai_bodies() -> None:
    limited = CheckResponse.parse(deny(RateLimited(Decision(False, 3.0, {}, "tokens")), grpc_client=True))
    assert limited.status.code == 8
    assert limited.denied_response.status.code == StatusCode.TooManyRequests
    headers = {h.header.key: h.header.value for h in limited.denied_response.headers}
    assert headers["retry-after"] == "3" and headers["grpc-status"] == "8"
    assert '"code": "rate_limit_exceeded"' in limited.denied_response.body
    quota = CheckResponse.parse(deny(QuotaExceeded("spent")))
    assert quota.denied_response.status.code == StatusCode.TooManyRequests
    assert '"insufficient_quota"' in quota.denied_response.body
    forbidden = CheckResponse.parse(deny(PermissionDenied("no")))
    assert (forbidden.status.code, forbidden.denied_response.status.code) == (7, StatusCode.Forbidden)
