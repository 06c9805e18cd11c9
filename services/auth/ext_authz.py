"""Envoy's ext_authz `envoy.service.auth.v3.Authorization/Check`, served with a
grpcio generic handler over envoy-data-plane's CheckRequest/CheckResponse.

Denials are answered here (not through the error interceptor): Envoy needs an
OK gRPC status carrying the HTTP denial it should send, with an OpenAI-shaped
JSON body."""

from __future__ import annotations

import functools
import json

import grpc
import structlog
from envoy_data_plane.envoy.config.core.v3 import (
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
)
from envoy_data_plane.envoy.service.auth.v3 import (
    CheckRequest,
    CheckResponse,
    DeniedHttpResponse,
    OkHttpResponse,
)
from envoy_data_plane.envoy.type.v3 import HttpStatus, StatusCode
from envoy_data_plane.google.rpc import Status

from mariana_common.errors import PermissionDenied, Unauthenticated, Unavailable
from mariana_common.server import Context, Registrar
from services.auth.authorizer import Authorizer, QuotaExceeded, RateLimited, Verdict

log = structlog.get_logger()

SERVICE_NAME = "envoy.service.auth.v3.Authorization"
TENANT_HEADER = "x-mariana-tenant"
KEY_ID_HEADER = "x-mariana-key-id"
MODELS_HEADER = "x-mariana-models"
# Headers only auth may set; the edge strips them from client requests too.
IDENTITY_HEADERS = (TENANT_HEADER, KEY_ID_HEADER, MODELS_HEADER)

GRPC_OK = 0
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


def _header(name: str, value: str) -> HeaderValueOption:
    return HeaderValueOption(
        header=HeaderValue(key=name, value=value),
        append_action=HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD,
    )


@functools.lru_cache(maxsize=4096)
def _identity_part(tenant_id: str, key_id: str, models: str) -> bytes:
    headers = [_header(TENANT_HEADER, tenant_id), _header(KEY_ID_HEADER, key_id), _header(MODELS_HEADER, models)]
    return bytes(CheckResponse(status=Status(code=GRPC_OK), ok_response=OkHttpResponse(headers=headers)))


@functools.lru_cache(maxsize=4096)
def _rate_part(headers: tuple[tuple[str, str], ...]) -> bytes:
    ok = OkHttpResponse(response_headers_to_add=[_header(k, v) for k, v in headers])
    return bytes(CheckResponse(ok_response=ok))


def allow(verdict: Verdict) -> bytes:
    """Built from cached, pre-serialized parts: protobuf merges concatenated
    messages (sub-messages merge, repeated fields append), and the parts repeat
    from request to request, so building the answer costs a lookup, not a
    serialization."""
    identity = verdict.identity
    answer = _identity_part(identity.tenant_id, identity.key_id, ",".join(sorted(identity.scopes.models)))
    if verdict.rate.headers:
        answer += _rate_part(tuple(sorted(verdict.rate.headers.items())))
    return answer


def _denied(
    grpc_code: int, http: StatusCode, kind: str, code: str, message: str, extra: dict[str, str] | None = None
) -> bytes:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}})
    headers = [_header("content-type", "application/json")] + [_header(k, v) for k, v in (extra or {}).items()]
    denied = DeniedHttpResponse(status=HttpStatus(code=http), headers=headers, body=body)
    return bytes(CheckResponse(status=Status(code=grpc_code, message=message), denied_response=denied))


def deny(error: Exception, grpc_client: bool = False) -> bytes:
    if isinstance(error, RateLimited):
        decision = error.decision
        headers = {"retry-after": str(max(1, int(decision.retry_after_s))), **decision.headers}
        if grpc_client:  # Envoy would map HTTP 429 to UNAVAILABLE; gRPC's own code is RESOURCE_EXHAUSTED
            headers["grpc-status"] = str(GRPC_RESOURCE_EXHAUSTED)
        kind = decision.exceeded or "requests"
        return _denied(
            GRPC_RESOURCE_EXHAUSTED,
            StatusCode.TooManyRequests,
            kind,
            "rate_limit_exceeded",
            f"Rate limit reached for {kind} per minute. Retry after {headers['retry-after']}s.",
            headers,
        )
    if isinstance(error, QuotaExceeded):
        extra = {"grpc-status": str(GRPC_RESOURCE_EXHAUSTED)} if grpc_client else {}
        return _denied(
            GRPC_RESOURCE_EXHAUSTED,
            StatusCode.TooManyRequests,
            "insufficient_quota",
            "insufficient_quota",
            str(error),
            extra,
        )
    if isinstance(error, PermissionDenied):
        return _denied(
            GRPC_PERMISSION_DENIED, StatusCode.Forbidden, "permission_error", "permission_denied", str(error)
        )
    if isinstance(error, Unavailable):
        return _denied(
            GRPC_UNAVAILABLE,
            StatusCode.ServiceUnavailable,
            "server_error",
            "unavailable",
            str(error),
            {"retry-after": "1"},
        )
    return _denied(
        GRPC_UNAUTHENTICATED, StatusCode.Unauthorized, "invalid_request_error", "invalid_api_key", str(error)
    )


class ExtAuthz:
    def __init__(self, authorizer: Authorizer) -> None:
        self._authorizer = authorizer

    async def check(self, request: CheckRequest, context: Context) -> bytes:
        http = request.attributes.request.http if request.attributes and request.attributes.request else None
        if http is None:
            return deny(Unauthenticated("no HTTP attributes in the check request"))
        try:
            verdict = await self._authorizer.authorize(http.headers.get("authorization", ""), http.path)
        except (Unauthenticated, PermissionDenied, Unavailable, RateLimited, QuotaExceeded) as error:
            log.info("denied", path=http.path, reason=str(error), request_id=http.headers.get("x-request-id"))
            grpc_client = http.headers.get("content-type", "").startswith("application/grpc")
            return deny(error, grpc_client)
        return allow(verdict)


def register(authz: ExtAuthz) -> Registrar:
    def add(server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            authz.check, request_deserializer=CheckRequest.parse, response_serializer=lambda b: b
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, {"Check": handler}),))

    return add
